/*-------------------------------------------------------------------------
 *
 * option_rights.c
 *		  Who may set which option, and where; and whom the lake connects as.
 *
 * A wrapper on this host connects from inside the backend, as the server's
 * OS user, so an option that names a connection string, a file, an endpoint
 * or a credential mode decides what the backend reaches on somebody's
 * behalf: a `dsn` in a user mapping could log in as the superuser over the
 * local socket (peer and trust both let the postgres OS user in).  Such
 * options are therefore superuser-only and server-only for every wrapper the
 * host runs, as is what bounds one query's work (a role able to create a
 * foreign table must not lift the guard for itself).  Credentials may also go
 * in a user mapping (FOR PUBLIC is the lake's), but only a superuser writes
 * them and never into a foreign table, whose options every reader sees.
 *
 * IDENTIFICATION
 *		  ext/option_rights.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_user_mapping.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"

/* Where the wrapper connects, which files and endpoints, how much one query may do. */
static const char *const server_options[] = {
	"dsn", "store", "aws_endpoint_url", "endpoint", "aws_region", "region",
	"aws_credentials", "max_window", "max_processes", "max_stale_spans", "shared_files", NULL
};

/* The lake's credentials: server or user mapping, written by a superuser. */
static const char *const credential_options[] = {
	"aws_access_key_id", "aws_secret_access_key", "aws_session_token", NULL
};

static bool
listed(const char *name, const char *const *list)
{
	for (; *list != NULL; list++)
		if (strcmp(name, *list) == 0)
			return true;
	return false;
}

void
pyhost_check_option_rights(const char *name, Oid catalog)
{
	bool		server_only = listed(name, server_options);
	bool		credential = listed(name, credential_options);

	if (!server_only && !credential)
		return;
	if (catalog != ForeignServerRelationId &&
		(server_only || catalog != UserMappingRelationId))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
				 errmsg("option \"%s\" can only be set on a foreign server%s", name,
						server_only ? "" : " or in a user mapping"),
				 errdetail("It decides where or as whom the wrapper connects, which files or "
						   "endpoints it touches, or how much work one query may start."),
				 errhint("A superuser sets it with ALTER SERVER ... OPTIONS (ADD %s '...')%s.",
						 name,
						 server_only ? "" : ", or CREATE USER MAPPING FOR PUBLIC SERVER ... OPTIONS (...)")));
	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to set option \"%s\"", name),
				 errdetail("The wrapper connects from inside the server as its own OS user: "
						   "this option decides where, as whom, or with which credentials."),
				 errhint("Ask a superuser to set it on the server (ALTER SERVER ... OPTIONS).")));
}

/*
 * The role owning the otelspans extension in this database (palloc'd), or
 * NULL: the lake's default connection logs in as that role, whoever queries.
 */
char *
pyhost_extension_owner(void)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			owner = InvalidOid;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("otelspans"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return OidIsValid(owner) ? GetUserNameFromId(owner, true) : NULL;
}
