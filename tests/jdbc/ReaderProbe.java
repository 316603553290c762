// What a BI tool does over JDBC, as a reader: list tables, preview one, run a time-window
// query as a prepared statement often enough to be server-prepared, and page with a cursor.
// Prints key=value lines for tests/test_roles.py to compare with the ingested spans.

import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.time.LocalDateTime;
import java.time.OffsetDateTime;
import java.util.Properties;
import java.util.UUID;

public final class ReaderProbe {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        UUID process = UUID.fromString(args[3]);
        OffsetDateTime since = OffsetDateTime.parse(args[4]);
        try (Connection c = DriverManager.getConnection(url, props)) {
            DatabaseMetaData md = c.getMetaData();
            try (ResultSet rs = md.getTables(null, null, "otel_spans", null)) {
                while (rs.next()) {
                    System.out.println("table=" + rs.getString("TABLE_SCHEM") + "."
                            + rs.getString("TABLE_NAME") + ":" + rs.getString("TABLE_TYPE"));
                }
            }
            int preview = 0;
            try (PreparedStatement ps = c.prepareStatement("SELECT * FROM otel_spans LIMIT 200");
                    ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    preview++;
                }
            }
            System.out.println("preview=" + preview);
            String window = "SELECT count(*) FROM otel_spans WHERE start_time >= ?";
            try (PreparedStatement ps = c.prepareStatement(window)) {
                for (int i = 0; i < 10; i++) {
                    ps.setObject(1, since.atZoneSameInstant(java.time.ZoneId.systemDefault())
                            .toLocalDateTime());
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        System.out.println("local" + i + "=" + rs.getLong(1));
                    }
                }
                for (int i = 0; i < 10; i++) {
                    ps.setObject(1, since);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        System.out.println("offset" + i + "=" + rs.getLong(1));
                    }
                }
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT span_id FROM otel_spans WHERE process_id = ?")) {
                ps.setFetchSize(3);
                ps.setObject(1, process);
                int rows = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        rows++;
                    }
                }
                System.out.println("cursor=" + rows);
            }
            c.commit();
        }
    }
}
