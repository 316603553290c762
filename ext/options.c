/*-------------------------------------------------------------------------
 *
 * options.c
 *		  Option validation, and the per-table cache of wrapper instances.
 *
 * The `wrapper` option names a Python class that the server will import and
 * run inside every backend that scans the table: it is arbitrary code, so
 * only a superuser may set it.  Every other option is the wrapper's business
 * and passed through unchanged.
 *
 * A wrapper instance is built once per foreign table and backend, then
 * reused by every scan.  The cache entry remembers a signature of everything
 * the instance was built from (class, server, table, user mapping and
 * column options, column names and types), so ALTER SERVER / ALTER FOREIGN
 * TABLE rebuild it on the next use without any invalidation callback.
 *
 * IDENTIFICATION
 *		  ext/options.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "access/htup_details.h"
#include "access/reloptions.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_foreign_table.h"
#include "catalog/pg_user_mapping.h"
#include "commands/defrem.h"
#include "foreign/foreign.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

PG_FUNCTION_INFO_V1(otelspans_fdw_validator);

typedef struct InstanceCacheEntry
{
	Oid			foreigntableid; /* hash key */
	char	   *signature;		/* in TopMemoryContext */
	PyObject   *instance;		/* strong reference */
	PyObject   *column_names;	/* list of str, table order */
} InstanceCacheEntry;

static HTAB *instance_cache = NULL;

/*
 * Validate options of the FDW, servers, user mappings, tables and columns.
 */
Datum
otelspans_fdw_validator(PG_FUNCTION_ARGS)
{
	List	   *options = untransformRelOptions(PG_GETARG_DATUM(0));
	Oid			catalog = PG_GETARG_OID(1);
	ListCell   *lc;
	bool		has_wrapper = false;

	foreach(lc, options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);

		pyhost_check_option_rights(def->defname, catalog);
		if (strcmp(def->defname, "wrapper") != 0)
			continue;
		has_wrapper = true;
		/* multicorn2's messages */
		if (catalog != ForeignServerRelationId)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
					 errmsg("Cannot set the wrapper class on the table"),
					 errhint("Set it on the server")));
		if (!superuser())
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to set option \"wrapper\""),
					 errdetail("The wrapper class runs arbitrary Python code inside the server."),
					 errhint("Ask a superuser to create or alter the server.")));
		if (strchr(defGetString(def), '.') == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_STRING_FORMAT),
					 errmsg("invalid value for option \"wrapper\": \"%s\"", defGetString(def)),
					 errhint("Give the class as module.Class, for example tests.wrappers.Rows.")));
	}
	/* A server names its class: without one, refused now rather than at the first scan. */
	if (catalog == ForeignServerRelationId && !has_wrapper)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("The wrapper parameter is mandatory, specify a valid class name"),
				 errhint("CREATE SERVER ... FOREIGN DATA WRAPPER otelspans_fdw OPTIONS (wrapper 'module.Class'); only a superuser may set it.")));
	PG_RETURN_VOID();
}

static void
append_options(StringInfo sig, const char *what, List *options)
{
	ListCell   *lc;

	appendStringInfo(sig, "%s:", what);
	foreach(lc, options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);

		appendStringInfo(sig, "%s=%s\x1f", def->defname, defGetString(def));
	}
	appendStringInfoChar(sig, '\x1e');
}

/* The options of the current user's mapping, else PUBLIC's, else none. */
List *
user_mapping_options(Oid serverid)
{
	Oid			users[2] = {GetUserId(), InvalidOid};

	for (int i = 0; i < 2; i++)
	{
		HeapTuple	tp = SearchSysCache2(USERMAPPINGUSERSERVER,
										 ObjectIdGetDatum(users[i]),
										 ObjectIdGetDatum(serverid));

		if (HeapTupleIsValid(tp))
		{
			bool		isnull;
			Datum		datum = SysCacheGetAttr(USERMAPPINGUSERSERVER, tp,
												Anum_pg_user_mapping_umoptions, &isnull);
			List	   *res = isnull ? NIL : untransformRelOptions(datum);

			ReleaseSysCache(tp);
			return res;
		}
	}
	return NIL;
}

static void
dict_set_options(PyObject *dict, List *options)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);
		PyObject   *v;

		if (strcmp(def->defname, "wrapper") == 0)
			continue;
		v = PyUnicode_FromString(defGetString(def));
		if (v == NULL || PyDict_SetItemString(dict, def->defname, v) < 0)
		{
			Py_XDECREF(v);
			pyhost_report_error("building options");
		}
		Py_DECREF(v);
	}
}

/*
 * Build the wrapper instance: options = server, then user mapping, then
 * table options (later wins); columns = {name: ColumnDefinition}.
 */
static PyObject *
build_instance(Relation rel, ForeignServer *server, ForeignTable *table,
			   List *um_options, const char *wrapper, PyObject **column_names)
{
	PyObject   *api = pyhost_api_module();
	PyObject   *options = PyDict_New();
	PyObject   *columns = PyDict_New();
	PyObject   *names = PyList_New(0);
	PyObject   *coldef_class;
	PyObject   *module;
	PyObject   *cls;
	PyObject   *instance;
	const char *dot = strrchr(wrapper, '.');
	char	   *modname = pnstrdup(wrapper, dot - wrapper);
	TupleDesc	tupdesc = RelationGetDescr(rel);

	dict_set_options(options, server->options);
	dict_set_options(options, um_options);
	dict_set_options(options, table->options);

	coldef_class = pyhost_check(PyObject_GetAttrString(api, "ColumnDefinition"),
								"multicorn_api.ColumnDefinition");
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);
		PyObject   *colopts = PyDict_New();
		PyObject   *coldef;
		PyObject   *name;
		char	   *typname;
		char	   *basetypname;

		if (att->attisdropped)
			continue;
		dict_set_options(colopts, GetForeignColumnOptions(RelationGetRelid(rel), att->attnum));
		typname = format_type_with_typemod(att->atttypid, att->atttypmod);
		basetypname = format_type_be(getBaseType(att->atttypid));
		coldef = PyObject_CallFunction(coldef_class, "sIissO", NameStr(att->attname),
									   (unsigned int) att->atttypid, (int) att->atttypmod,
									   typname, basetypname, colopts);
		Py_DECREF(colopts);
		pyhost_check(coldef, "ColumnDefinition()");
		name = PyUnicode_FromString(NameStr(att->attname));
		PyDict_SetItem(columns, name, coldef);
		PyList_Append(names, name);
		Py_DECREF(name);
		Py_DECREF(coldef);
	}
	Py_DECREF(coldef_class);

	pyhost_enter();
	module = PyImport_ImportModule(modname);
	if (module == NULL)
	{
		pyhost_leave();
		pyhost_report_error(psprintf("importing wrapper module %s", modname));
	}
	cls = PyObject_GetAttrString(module, dot + 1);
	Py_DECREF(module);
	if (cls == NULL)
	{
		pyhost_leave();
		pyhost_report_error(psprintf("finding wrapper class %s", wrapper));
	}
	instance = PyObject_CallFunctionObjArgs(cls, options, columns, NULL);
	pyhost_leave();
	Py_DECREF(cls);
	Py_DECREF(options);
	Py_DECREF(columns);
	if (instance == NULL)
	{
		Py_DECREF(names);
		pyhost_report_error(psprintf("%s.__init__", wrapper));
	}
	*column_names = names;
	return instance;
}

/*
 * The wrapper instance of a foreign table (borrowed reference, valid until
 * the next call for the same table).
 */
PyObject *
pyhost_get_instance(Oid foreigntableid, PyObject **column_names)
{
	ForeignTable *table = GetForeignTable(foreigntableid);
	ForeignServer *server = GetForeignServer(table->serverid);
	List	   *um_options = user_mapping_options(server->serverid);
	const char *wrapper = NULL;
	StringInfoData sig;
	InstanceCacheEntry *entry;
	bool		found;
	Relation	rel;
	TupleDesc	tupdesc;
	ListCell   *lc;

	foreach(lc, server->options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);

		if (strcmp(def->defname, "wrapper") == 0)
			wrapper = defGetString(def);
	}
	if (wrapper == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("foreign server \"%s\" has no \"wrapper\" option", server->servername),
				 errhint("A superuser sets it with ALTER SERVER %s OPTIONS (ADD wrapper 'module.Class').",
						 quote_identifier(server->servername))));

	pyhost_ensure_initialized();

	rel = RelationIdGetRelation(foreigntableid);
	tupdesc = RelationGetDescr(rel);
	initStringInfo(&sig);
	appendStringInfo(&sig, "%s\x1e", wrapper);
	append_options(&sig, "server", server->options);
	append_options(&sig, "user", um_options);
	append_options(&sig, "table", table->options);
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);

		if (att->attisdropped)
			continue;
		appendStringInfo(&sig, "%s %u %d\x1f", NameStr(att->attname), att->atttypid, att->atttypmod);
		append_options(&sig, "col", GetForeignColumnOptions(foreigntableid, att->attnum));
	}

	if (instance_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(InstanceCacheEntry);
		instance_cache = hash_create("otelspans wrapper instances", 16, &ctl,
									 HASH_ELEM | HASH_BLOBS);
	}
	entry = hash_search(instance_cache, &foreigntableid, HASH_ENTER, &found);
	if (!found)
	{
		entry->signature = NULL;
		entry->instance = NULL;
		entry->column_names = NULL;
	}
	if (entry->instance == NULL || strcmp(entry->signature, sig.data) != 0)
	{
		PyObject   *names = NULL;
		PyObject   *instance;

		PG_TRY();
		{
			instance = build_instance(rel, server, table, um_options, wrapper, &names);
		}
		PG_FINALLY();
		{
			RelationClose(rel);
		}
		PG_END_TRY();

		Py_XDECREF(entry->instance);
		Py_XDECREF(entry->column_names);
		if (entry->signature)
			pfree(entry->signature);
		entry->instance = instance;
		entry->column_names = names;
		entry->signature = MemoryContextStrdup(TopMemoryContext, sig.data);
	}
	else
		RelationClose(rel);
	pfree(sig.data);
	if (column_names)
		*column_names = entry->column_names;
	return entry->instance;
}
