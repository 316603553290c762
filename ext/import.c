/*-------------------------------------------------------------------------
 *
 * import.c
 *		  IMPORT FOREIGN SCHEMA through the wrapper class's import_schema.
 *
 * As multicorn2: the class named by the server's `wrapper` option is asked
 * import_schema(remote_schema, server and user mapping options without
 * `wrapper`, the statement's options, 'limit' / 'except' / None, the table
 * names of LIMIT TO / EXCEPT); each TableDefinition it returns gives its
 * CREATE FOREIGN TABLE through to_statement(local_schema, server).
 * PostgreSQL itself then applies LIMIT TO / EXCEPT to the statements too.
 *
 * IDENTIFICATION
 *		  ext/import.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "commands/defrem.h"
#include "foreign/fdwapi.h"
#include "foreign/foreign.h"
#include "miscadmin.h"

static PyObject *
options_dict(List *options, PyObject *dict)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);
		PyObject   *v;

		if (strcmp(def->defname, "wrapper") == 0)
			continue;
		v = PyUnicode_FromString(defGetString(def));
		PyDict_SetItemString(dict, def->defname, pyhost_check(v, "an option value"));
		Py_DECREF(v);
	}
	return dict;
}

static List *
pyhostImportForeignSchema(ImportForeignSchemaStmt *stmt, Oid serverOid)
{
	ForeignServer *server = GetForeignServer(serverOid);
	const char *wrapper = NULL;
	PyObject   *cls;
	PyObject   *srv_options;
	PyObject   *restricts;
	PyObject   *tables;
	PyObject   *iter;
	PyObject   *item;
	List	   *cmds = NIL;
	ListCell   *lc;
	const char *restriction = NULL;

	foreach(lc, server->options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);

		if (strcmp(def->defname, "wrapper") == 0)
			wrapper = defGetString(def);
	}
	if (wrapper == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("The wrapper parameter is mandatory, specify a valid class name")));
	pyhost_ensure_initialized();
	cls = pyhost_check(PyObject_CallMethod(pyhost_api_module(), "get_class", "s", wrapper),
					   "importing the wrapper class");

	srv_options = options_dict(server->options, PyDict_New());
	options_dict(user_mapping_options(serverOid), srv_options);
	if (stmt->list_type == FDW_IMPORT_SCHEMA_LIMIT_TO)
		restriction = "limit";
	else if (stmt->list_type == FDW_IMPORT_SCHEMA_EXCEPT)
		restriction = "except";
	restricts = PyList_New(0);
	foreach(lc, stmt->table_list)
	{
		PyObject   *name = PyUnicode_FromString(((RangeVar *) lfirst(lc))->relname);

		PyList_Append(restricts, name);
		Py_DECREF(name);
	}
	pyhost_enter();
	tables = PyObject_CallMethod(cls, "import_schema", "sNNzN", stmt->remote_schema, srv_options,
								 options_dict(stmt->options, PyDict_New()), restriction,
								 restricts);
	pyhost_leave();
	Py_DECREF(cls);
	pyhost_check(tables, "import_schema");
	iter = pyhost_check(PyObject_GetIter(tables), "import_schema's result");
	Py_DECREF(tables);
	while ((item = PyIter_Next(iter)) != NULL)
	{
		PyObject   *sql = PyObject_CallMethod(item, "to_statement", "ss", stmt->local_schema,
											  server->servername);
		const char *s;

		Py_DECREF(item);
		if (sql == NULL || !PyUnicode_Check(sql) || (s = PyUnicode_AsUTF8(sql)) == NULL)
		{
			Py_DECREF(iter);
			if (sql != NULL && !PyErr_Occurred())
				ereport(ERROR,
						(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
						 errmsg("to_statement() must return a string")));
			pyhost_report_error("to_statement");
		}
		cmds = lappend(cmds, pstrdup(s));
		Py_DECREF(sql);
	}
	Py_DECREF(iter);
	if (PyErr_Occurred())
		pyhost_report_error("import_schema's result");
	return cmds;
}

void
pyhost_import_routine(FdwRoutine *routine)
{
	routine->ImportForeignSchema = pyhostImportForeignSchema;
}
