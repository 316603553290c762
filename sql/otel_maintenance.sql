
-- Maintenance (issue 5): the same Python as `otelspans retention` / `otelspans publish`, run
-- in the backend through otelspans_call.  SECURITY DEFINER so that a role granted EXECUTE
-- needs no right on otelspans_call; not granted to PUBLIC (retention deletes data).  The
-- object store and its credentials come from otel_spans_server and the user mapping of the
-- function's owner (else PUBLIC's), the metadata database is this one.

-- Remove blocks, payloads, partitions and their files (and Iceberg entries) inserted before
-- the start of the UTC hour holding now() - older_than, batch_size blocks per transaction.
-- Partition files are deleted once retired for longer than grace (running scans finish).
CREATE FUNCTION otel_retention(
    older_than interval,
    batch_size integer DEFAULT 1000,
    grace interval DEFAULT '10 minutes'
) RETURNS jsonb
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $fn$
    SELECT otelspans_call(
        'otelspans_fdw.maintenance.retention',
        jsonb_build_object(
            'older_than_seconds', extract(epoch FROM older_than),
            'batch_size', batch_size,
            'grace_seconds', extract(epoch FROM grace)))
$fn$;

REVOKE ALL ON FUNCTION otel_retention(interval, integer, interval) FROM PUBLIC;

COMMENT ON FUNCTION otel_retention(interval, integer, interval) IS
    'delete spans inserted before now() - older_than (whole hours), in batches; returns counts';

-- Register new partition files in the Iceberg table (warehouse in the object store).
CREATE FUNCTION otel_publish(batch integer DEFAULT 500)
RETURNS jsonb
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = @extschema@, pg_temp
AS $fn$
    SELECT otelspans_call('otelspans_fdw.maintenance.publish', jsonb_build_object('batch', batch))
$fn$;

REVOKE ALL ON FUNCTION otel_publish(integer) FROM PUBLIC;

COMMENT ON FUNCTION otel_publish(integer) IS
    'register new partition files in the Iceberg table otelspans.otel_spans';
