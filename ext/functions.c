/*-------------------------------------------------------------------------
 *
 * functions.c
 *		  SQL-callable functions of the host.
 *
 * otelspans_call(function, args) runs a Python function of an installed
 * module inside the backend, with JSON in and out.  Maintenance that must
 * touch the object store as well as tables (retention, publishing) is
 * written once in Python and offered both as a CLI command and, through
 * this bridge, as a SQL function.  It runs arbitrary code, so the extension
 * script revokes it from PUBLIC; SQL wrappers that should be callable by
 * others are SECURITY DEFINER functions with fixed function names.
 *
 * IDENTIFICATION
 *		  ext/functions.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

PG_FUNCTION_INFO_V1(otelspans_call);

/*
 * otelspans_call(function text, args jsonb) returns jsonb
 *
 * `function` is module.attribute; it is called with the keys of `args` as
 * keyword arguments and must return something json.dumps accepts.
 */
Datum
otelspans_call(PG_FUNCTION_ARGS)
{
	char	   *function = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *args = PG_ARGISNULL(1) ? pstrdup("{}") :
		DatumGetCString(DirectFunctionCall1(jsonb_out, PG_GETARG_DATUM(1)));
	const char *dot = strrchr(function, '.');
	PyObject   *json;
	PyObject   *module;
	PyObject   *func;
	PyObject   *kwargs;
	PyObject   *empty;
	PyObject   *result;
	PyObject   *text;
	char	   *out;

	if (dot == NULL || dot == function || dot[1] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Python function name \"%s\"", function),
				 errhint("Give it as module.function.")));

	pyhost_ensure_initialized();
	json = pyhost_check(PyImport_ImportModule("json"), "import json");
	kwargs = PyObject_CallMethod(json, "loads", "s", args);
	if (kwargs == NULL || !PyDict_Check(kwargs))
	{
		Py_XDECREF(kwargs);
		Py_DECREF(json);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("arguments must be a JSON object")));
	}
	pyhost_enter();
	module = PyImport_ImportModule(pnstrdup(function, dot - function));
	func = module ? PyObject_GetAttrString(module, dot + 1) : NULL;
	Py_XDECREF(module);
	empty = PyTuple_New(0);
	result = func ? PyObject_Call(func, empty, kwargs) : NULL;
	pyhost_leave();
	Py_DECREF(empty);
	Py_XDECREF(func);
	Py_DECREF(kwargs);
	if (result == NULL)
	{
		Py_DECREF(json);
		pyhost_report_error(function);
	}
	text = PyObject_CallMethod(json, "dumps", "O", result);
	Py_DECREF(result);
	Py_DECREF(json);
	pyhost_check(text, "json.dumps of the result");
	out = pstrdup(PyUnicode_AsUTF8(text));
	Py_DECREF(text);
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(out)));
}
