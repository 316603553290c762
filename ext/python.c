/*-------------------------------------------------------------------------
 *
 * python.c
 *		  The embedded interpreter: start-up, errors, cancellation and the
 *		  conversion of single values between PostgreSQL and Python.
 *
 * One interpreter per backend, started on first use.  It never installs
 * Python's own signal handlers: PostgreSQL owns SIGINT/SIGTERM.  To make a
 * query cancel (or statement_timeout, which PostgreSQL turns into SIGINT)
 * interrupt long Python code, our SIGINT/SIGTERM handlers call PostgreSQL's
 * handler first and then, only while Python code of ours is running, trip
 * Python's interrupt flag (PyErr_SetInterruptEx is async-signal-safe).  The
 * resulting KeyboardInterrupt unwinds Python; the host then lets
 * CHECK_FOR_INTERRUPTS report the cancel the PostgreSQL way.
 *
 * IDENTIFICATION
 *		  ext/python.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include <dlfcn.h>
#include <signal.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "postmaster/postmaster.h"
#include "storage/ipc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/elog.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* Python's datetime.h uses the same include guard as utils/datetime.h. */
#undef DATETIME_H
#include <datetime.h>

#ifndef OTELSPANS_VENV
#define OTELSPANS_VENV "/opt/otelspans/venv"
#endif
#ifndef OTELSPANS_LIBPYTHON
#define OTELSPANS_LIBPYTHON "libpython3.11.so.1.0"
#endif

/* Settings (GUCs), defined in _PG_init of fdw.c. */
char	   *pyhost_venv = NULL;
char	   *pyhost_python_path = NULL;

static bool py_initialized = false;
static volatile sig_atomic_t pyhost_depth = 0;
static struct sigaction pg_sigint_action;
static struct sigaction pg_sigterm_action;

/* Cached Python objects (strong references for the life of the backend). */
static PyObject *api_module = NULL;
static PyObject *uuid_class = NULL;
static PyObject *decimal_class = NULL;
static PyObject *json_dumps = NULL;
static PyObject *utc_tz = NULL;
static PyObject *traceback_format = NULL;

static PyObject *host_log(PyObject *self, PyObject *args);
static PyObject *host_backend_info(PyObject *self, PyObject *args);
static void reset_depth_at_abort(XactEvent event, void *arg);
static void run_python_exit_handlers(int code, Datum arg);
static void reset_depth_at_subabort(SubXactEvent event, SubTransactionId mySubid,
									SubTransactionId parentSubid, void *arg);

static PyMethodDef host_methods[] = {
	{"log", host_log, METH_VARARGS,
	"log(level, message, hint, detail): report through ereport below ERROR"},
	{"backend_info", host_backend_info, METH_NOARGS,
	"backend_info(): database, user, data directory, port and socket directory of this backend"},
	{NULL, NULL, 0, NULL}
};

static struct PyModuleDef host_module_def = {
	PyModuleDef_HEAD_INIT, "_otelspans_host",
	"Services of the PostgreSQL host to Python wrappers.", -1, host_methods
};

static PyObject *
host_module_init(void)
{
	return PyModule_Create(&host_module_def);
}

/*
 * Signal handlers chained in front of PostgreSQL's.  They run PostgreSQL's
 * handler (which sets the pending-interrupt flags and the latch) and, while
 * Python code runs, ask Python to raise KeyboardInterrupt at its next check.
 */
static void
chain_signal(int signo, struct sigaction *pg_action)
{
	int			save_errno = errno;

	if (pg_action->sa_flags & SA_SIGINFO)
		pg_action->sa_sigaction(signo, NULL, NULL);
	else if (pg_action->sa_handler != SIG_IGN && pg_action->sa_handler != SIG_DFL)
		pg_action->sa_handler(signo);
	if (pyhost_depth > 0)
		PyErr_SetInterruptEx(SIGINT);
	errno = save_errno;
}

static void
pyhost_sigint(int signo)
{
	chain_signal(signo, &pg_sigint_action);
}

static void
pyhost_sigterm(int signo)
{
	chain_signal(signo, &pg_sigterm_action);
}

static void
install_signal_chain(void)
{
	struct sigaction act;
	PyObject   *signal_mod;
	PyObject   *res;

	sigaction(SIGINT, NULL, &pg_sigint_action);
	sigaction(SIGTERM, NULL, &pg_sigterm_action);

	/*
	 * Python only raises for a tripped SIGINT when its own table has a
	 * handler for it; signal.signal also sets the OS handler, which we
	 * replace right after with ours.
	 */
	signal_mod = pyhost_check(PyImport_ImportModule("signal"), "import signal");
	res = PyObject_CallMethod(signal_mod, "signal", "iO", SIGINT,
							  PyObject_GetAttrString(signal_mod, "default_int_handler"));
	Py_XDECREF(res);
	Py_DECREF(signal_mod);
	PyErr_Clear();

	memset(&act, 0, sizeof(act));
	sigemptyset(&act.sa_mask);
	act.sa_flags = SA_RESTART;
	act.sa_handler = pyhost_sigint;
	sigaction(SIGINT, &act, NULL);
	act.sa_handler = pyhost_sigterm;
	sigaction(SIGTERM, &act, NULL);
}

static PyObject *
import_attr(const char *module, const char *attr)
{
	PyObject   *mod = PyImport_ImportModule(module);
	PyObject   *res;

	if (mod == NULL)
		return NULL;
	res = PyObject_GetAttrString(mod, attr);
	Py_DECREF(mod);
	return res;
}

/*
 * Put the configured environment on sys.path as a venv would: the system's
 * site-packages/dist-packages out (Debian's older packages would shadow the
 * environment's), the venv's site-packages in (with .pth files), and in
 * front of everything the python_path entries.
 */
static void
setup_sys_path(void)
{
	PyObject   *setup;
	PyObject   *res;
	const char *code =
		"def _otelspans_setup(venv, extra):\n"
		"    import glob, site, sys\n"
		"    envs = sorted(glob.glob(venv + '/lib/python3*/site-packages')) if venv else []\n"
		"    if envs:\n"
		"        sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('-packages')]\n"
		"        for p in envs:\n"
		"            site.addsitedir(p)\n"
		"    for p in reversed([p for p in (extra or '').split(':') if p]):\n"
		"        sys.path.insert(0, p)\n"
		"    if not getattr(sys, 'argv', None):\n"
		"        sys.argv = ['postgres']\n";
	PyObject   *globals = PyDict_New();

	PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
	res = PyRun_String(code, Py_file_input, globals, globals);
	if (res == NULL)
		pyhost_report_error("setting up sys.path");
	Py_DECREF(res);
	setup = PyDict_GetItemString(globals, "_otelspans_setup");
	res = PyObject_CallFunction(setup, "ss", pyhost_venv ? pyhost_venv : "",
								pyhost_python_path ? pyhost_python_path : "");
	Py_DECREF(globals);
	pyhost_check(res, "setting up sys.path");
	Py_DECREF(res);
}

void
pyhost_ensure_initialized(void)
{
	PyConfig	config;
	PyStatus	status;

	if (py_initialized)
		return;

	/*
	 * C extension modules (pyarrow, protobuf, ...) expect the interpreter's
	 * symbols to be global; PostgreSQL loads us with RTLD_LOCAL.
	 */
	if (dlopen(OTELSPANS_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not load %s: %s", OTELSPANS_LIBPYTHON, dlerror())));

	if (PyImport_AppendInittab("_otelspans_host", host_module_init) < 0)
		elog(ERROR, "could not register the _otelspans_host module");

	PyConfig_InitPythonConfig(&config);
	config.install_signal_handlers = 0;
	config.parse_argv = 0;
	config.buffered_stdio = 0;
	status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if (PyStatus_Exception(status))
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not start the Python interpreter: %s",
						status.err_msg ? status.err_msg : "unknown error")));
	py_initialized = true;

	on_proc_exit(run_python_exit_handlers, (Datum) 0);
	RegisterXactCallback(reset_depth_at_abort, NULL);
	RegisterSubXactCallback(reset_depth_at_subabort, NULL);
	install_signal_chain();
	setup_sys_path();

	PyDateTime_IMPORT;
	if (PyDateTimeAPI == NULL)
		pyhost_report_error("import datetime");
	uuid_class = pyhost_check(import_attr("uuid", "UUID"), "import uuid");
	decimal_class = pyhost_check(import_attr("decimal", "Decimal"), "import decimal");
	json_dumps = pyhost_check(import_attr("json", "dumps"), "import json");
	utc_tz = pyhost_check(import_attr("datetime", "timezone"), "import datetime");
	{
		PyObject   *utc = pyhost_check(PyObject_GetAttrString(utc_tz, "utc"), "datetime.timezone.utc");

		Py_DECREF(utc_tz);
		utc_tz = utc;
	}
	traceback_format = pyhost_check(import_attr("traceback", "format_exception"), "import traceback");
	api_module = pyhost_check(PyImport_ImportModule("otelspans_fdw.multicorn_api"),
							  "import otelspans_fdw.multicorn_api");
	/* `import multicorn` in a wrapper written for multicorn2 gets this API */
	Py_DECREF(pyhost_check(PyObject_CallMethod(api_module, "install_multicorn_alias", NULL),
						   "install_multicorn_alias"));
}

/*
 * The interpreter is never finalized (a backend just exits), so Python's
 * atexit handlers would not run; some must, before C++ static destructors:
 * pyarrow's finalize_s3, for one, or the AWS SDK crashes the exiting backend.
 */
static void
run_python_exit_handlers(int code, Datum arg)
{
	PyObject   *mod;

	if (!py_initialized || !Py_IsInitialized())
		return;
	mod = PyImport_ImportModule("atexit");
	if (mod != NULL)
	{
		PyObject   *res = PyObject_CallMethod(mod, "_run_exitfuncs", NULL);

		Py_XDECREF(res);
		Py_DECREF(mod);
	}
	PyErr_Clear();
}

PyObject *
pyhost_api_module(void)
{
	pyhost_ensure_initialized();
	return api_module;
}

/*
 * An ERROR raised between pyhost_enter and pyhost_leave skips the leave; at
 * the end of the (sub)transaction no Python code of ours is running.
 */
static void
reset_depth_at_abort(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		pyhost_depth = 0;
}

static void
reset_depth_at_subabort(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		pyhost_depth = 0;
}

void
pyhost_enter(void)
{
	pyhost_depth++;
}

/*
 * Leaving Python: a cancel that arrived after Python last looked must not
 * surface in the next, unrelated Python call.  PostgreSQL's own flag is still
 * set, so the caller's CHECK_FOR_INTERRUPTS reports it.
 */
void
pyhost_leave(void)
{
	if (pyhost_depth > 0)
		pyhost_depth--;
	if (pyhost_depth == 0 && py_initialized)
	{
		PyObject   *type,
				   *value,
				   *tb;

		PyErr_Fetch(&type, &value, &tb);
		if (PyErr_CheckSignals() < 0)
			PyErr_Clear();
		PyErr_Restore(type, value, tb);
	}
}

/* ---------------------------------------------------------------------
 * Errors
 * ---------------------------------------------------------------------
 */

static char *
py_str_dup(PyObject *obj)
{
	PyObject   *s;
	const char *utf8;
	char	   *res = NULL;

	if (obj == NULL || obj == Py_None)
		return NULL;
	s = PyUnicode_Check(obj) ? (Py_INCREF(obj), obj) : PyObject_Str(obj);
	if (s == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	utf8 = PyUnicode_AsUTF8(s);
	if (utf8 != NULL)
		res = pstrdup(utf8);
	else
		PyErr_Clear();
	Py_DECREF(s);
	return res;
}

static char *
attr_str_dup(PyObject *obj, const char *name)
{
	PyObject   *attr;
	char	   *res;

	if (obj == NULL || !PyObject_HasAttrString(obj, name))
		return NULL;
	attr = PyObject_GetAttrString(obj, name);
	if (attr == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	res = py_str_dup(attr);
	Py_DECREF(attr);
	return res;
}

void
pyhost_report_error(const char *context)
{
	PyObject   *type,
			   *value,
			   *tb;
	char	   *message;
	char	   *hint;
	char	   *detail;
	char	   *sqlstate;
	char	   *traceback = NULL;
	char	   *typename = NULL;
	bool		interrupted;
	bool		refusal;
	int			code = ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;

	PyErr_Fetch(&type, &value, &tb);
	if (type == NULL)
		elog(ERROR, "Python call failed without an exception (%s)", context);
	PyErr_NormalizeException(&type, &value, &tb);
	if (tb != NULL && value != NULL)
		PyException_SetTraceback(value, tb);

	interrupted = PyErr_GivenExceptionMatches(type, PyExc_KeyboardInterrupt);
	message = py_str_dup(value);
	hint = attr_str_dup(value, "hint");
	detail = attr_str_dup(value, "detail");
	sqlstate = attr_str_dup(value, "sqlstate");
	if (PyType_Check(type))
		typename = pstrdup(((PyTypeObject *) type)->tp_name);

	/*
	 * A refusal the wrapper raised on purpose (an error carrying its own
	 * SQLSTATE and a hint attribute, as otelspans' errors do) is the user's
	 * to read, not a failure: its traceback would only flood the server log.
	 * Everything else, internal errors (XX000) included, keeps it.
	 */
	refusal = value != NULL && sqlstate != NULL && strlen(sqlstate) == 5 &&
		strcmp(sqlstate, "XX000") != 0 && PyObject_HasAttrString(value, "hint");
	if (!interrupted && !refusal && traceback_format != NULL)
	{
		PyObject   *lines = PyObject_CallFunctionObjArgs(traceback_format, type,
														 value ? value : Py_None,
														 tb ? tb : Py_None, NULL);

		if (lines != NULL)
		{
			PyObject   *empty = PyUnicode_FromString("");
			PyObject   *joined = PyUnicode_Join(empty, lines);

			traceback = py_str_dup(joined);
			Py_XDECREF(joined);
			Py_DECREF(empty);
			Py_DECREF(lines);
		}
		PyErr_Clear();
	}
	Py_XDECREF(type);
	Py_XDECREF(value);
	Py_XDECREF(tb);

	if (interrupted)
	{
		/* The cancel (or timeout, or terminate) is PostgreSQL's to report. */
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("canceling statement due to user request")));
	}

	if (sqlstate != NULL && strlen(sqlstate) == 5)
		code = MAKE_SQLSTATE(sqlstate[0], sqlstate[1], sqlstate[2], sqlstate[3], sqlstate[4]);

	/*
	 * A plain Python exception (no hint, detail or SQLSTATE of its own) reads
	 * as multicorn2 shows it: the class in the message, its text in DETAIL.
	 */
	if (sqlstate == NULL && hint == NULL && detail == NULL && typename != NULL)
	{
		const char *dot = strrchr(typename, '.');

		detail = message && *message ? message : NULL;
		message = psprintf("Error in python: %s", dot ? dot + 1 : typename);
	}

	ereport(ERROR,
			(errcode(code),
			 errmsg("%s", message && *message ? message : (typename ? typename : "Python error")),
			 detail ? errdetail("%s", detail) : 0,
			 hint ? errhint("%s", hint) : 0,
			 /* what was called goes to the log only: multicorn2 adds no CONTEXT line */
			 traceback ? errdetail_log("Python %s (%s) failed:\n%s", context,
									   typename ? typename : "exception", traceback) : 0));
	pg_unreachable();
}

PyObject *
pyhost_check(PyObject *obj, const char *context)
{
	if (obj == NULL)
		pyhost_report_error(context);
	return obj;
}

/*
 * _otelspans_host.log: the multicorn log_to_postgres below ERROR.  ERROR
 * never comes here (the API module raises instead), so the ereport cannot
 * longjmp through Python frames except on out-of-memory, which we catch.
 */
static PyObject *
host_log(PyObject *self, PyObject *args)
{
	int			level;
	const char *message;
	const char *hint = NULL;
	const char *detail = NULL;
	int			pglevel;
	volatile bool failed = false;

	if (!PyArg_ParseTuple(args, "is|zz", &level, &message, &hint, &detail))
		return NULL;
	if (level >= 40)
	{
		PyErr_SetString(PyExc_ValueError, "log level ERROR and above must be raised");
		return NULL;
	}
	pglevel = level >= 30 ? WARNING : level >= 20 ? NOTICE : DEBUG1;

	PG_TRY();
	{
		ereport(pglevel,
				(errmsg("%s", message),
				 hint ? errhint("%s", hint) : 0,
				 detail ? errdetail("%s", detail) : 0));
	}
	PG_CATCH();
	{
		FlushErrorState();
		failed = true;
	}
	PG_END_TRY();
	if (failed)
	{
		PyErr_SetString(PyExc_RuntimeError, "could not report a message to PostgreSQL");
		return NULL;
	}
	Py_RETURN_NONE;
}

/*
 * _otelspans_host.backend_info: what a wrapper needs to connect back to the
 * database it runs in, which the Multicorn2 API does not tell it.
 */
static PyObject *
host_backend_info(PyObject *self, PyObject *args)
{
	char	   *dbname = get_database_name(MyDatabaseId);
	char	   *user = GetUserNameFromId(GetUserId(), true);
	const char *sockets = GetConfigOption("unix_socket_directories", true, false);
	char	   *first_socket = NULL;

	if (sockets != NULL && *sockets != '\0')
	{
		char	   *comma;

		first_socket = pstrdup(sockets);
		comma = strchr(first_socket, ',');
		if (comma)
			*comma = '\0';
		while (*first_socket == ' ')
			first_socket++;
	}
	/*
	 * The statement's start (an open upper end of a time window means "now"
	 * as the statement sees it) as microseconds since the Unix epoch, and the
	 * session's TimeZone (timestamp and date values compare in it).
	 */
	return Py_BuildValue("{s:z,s:z,s:s,s:i,s:z,s:z,s:L,s:z}",
						 "database", dbname, "user", user, "data_directory", DataDir,
						 "port", PostPortNumber, "socket_directory", first_socket,
						 "extension_owner", pyhost_extension_owner(),
						 "statement_time_us",
						 (long long) (GetCurrentStatementStartTimestamp() +
									  (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY),
						 "timezone", GetConfigOption("TimeZone", true, false));
}

/* ---------------------------------------------------------------------
 * PostgreSQL -> Python
 * ---------------------------------------------------------------------
 */

static PyObject *
datum_via_output(Datum value, Oid typid)
{
	Oid			outfunc;
	bool		isvarlena;
	char	   *s;

	getTypeOutputInfo(typid, &outfunc, &isvarlena);
	s = OidOutputFunctionCall(outfunc, value);
	return PyUnicode_FromString(s);
}

static PyObject *
timestamp_to_python(Timestamp ts, bool with_tz)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(ts))
	{
		PyObject   *cls = (PyObject *) PyDateTimeAPI->DateTimeType;

		return PyObject_GetAttrString(cls, TIMESTAMP_IS_NOBEGIN(ts) ? "min" : "max");
	}
	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	if (tm.tm_year < 1 || tm.tm_year > 9999)
		return PyUnicode_FromString(DatumGetCString(DirectFunctionCall1(timestamp_out, TimestampGetDatum(ts))));
	return PyDateTimeAPI->DateTime_FromDateAndTime(tm.tm_year, tm.tm_mon, tm.tm_mday,
												   tm.tm_hour, tm.tm_min, tm.tm_sec, fsec,
												   with_tz ? utc_tz : Py_None,
												   PyDateTimeAPI->DateTimeType);
}

PyObject *
pyhost_datum_to_python(Datum value, bool isnull, Oid typid)
{
	if (isnull)
		Py_RETURN_NONE;

	switch (typid)
	{
		case BOOLOID:
			return PyBool_FromLong(DatumGetBool(value));
		case INT2OID:
			return PyLong_FromLong(DatumGetInt16(value));
		case INT4OID:
			return PyLong_FromLong(DatumGetInt32(value));
		case INT8OID:
			return PyLong_FromLongLong(DatumGetInt64(value));
		case OIDOID:
			return PyLong_FromUnsignedLong(DatumGetObjectId(value));
		case FLOAT4OID:
			return PyFloat_FromDouble(DatumGetFloat4(value));
		case FLOAT8OID:
			return PyFloat_FromDouble(DatumGetFloat8(value));
		case NUMERICOID:
			{
				char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out, value));

				return PyObject_CallFunction(decimal_class, "s", s);
			}
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			{
				text	   *t = DatumGetTextPP(value);

				return PyUnicode_FromStringAndSize(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			}
		case NAMEOID:
			return PyUnicode_FromString(NameStr(*DatumGetName(value)));
		case BYTEAOID:
			{
				bytea	   *b = DatumGetByteaPP(value);

				return PyBytes_FromStringAndSize(VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b));
			}
		case UUIDOID:
			{
				pg_uuid_t  *u = DatumGetUUIDP(value);
				PyObject   *bytes = PyBytes_FromStringAndSize((const char *) u->data, UUID_LEN);
				PyObject   *kwargs;
				PyObject   *args;
				PyObject   *res;

				if (bytes == NULL)
					return NULL;
				kwargs = Py_BuildValue("{s:N}", "bytes", bytes);
				args = PyTuple_New(0);
				res = PyObject_Call(uuid_class, args, kwargs);
				Py_DECREF(args);
				Py_XDECREF(kwargs);
				return res;
			}
		case DATEOID:
			{
				DateADT		d = DatumGetDateADT(value);
				int			y,
							m,
							dd;

				if (DATE_NOT_FINITE(d))
					return PyObject_GetAttrString((PyObject *) PyDateTimeAPI->DateType,
												  DATE_IS_NOBEGIN(d) ? "min" : "max");
				j2date(d + POSTGRES_EPOCH_JDATE, &y, &m, &dd);
				if (y < 1 || y > 9999)
					return datum_via_output(value, typid);
				return PyDateTimeAPI->Date_FromDate(y, m, dd, PyDateTimeAPI->DateType);
			}
		case TIMESTAMPOID:
			return timestamp_to_python(DatumGetTimestamp(value), false);
		case TIMESTAMPTZOID:
			return timestamp_to_python(DatumGetTimestampTz(value), true);
		default:
			break;
	}

	/* Arrays of any element type become lists (multi-dimensional: flattened). */
	if (type_is_array(typid))
	{
		ArrayType  *arr = DatumGetArrayTypeP(value);
		Oid			elemtype = ARR_ELEMTYPE(arr);
		int16		typlen;
		bool		typbyval;
		char		typalign;
		Datum	   *elems;
		bool	   *nulls;
		int			nelems;
		PyObject   *list;

		get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
		deconstruct_array(arr, elemtype, typlen, typbyval, typalign, &elems, &nulls, &nelems);
		list = PyList_New(nelems);
		if (list == NULL)
			return NULL;
		for (int i = 0; i < nelems; i++)
		{
			PyObject   *item = pyhost_datum_to_python(elems[i], nulls[i], elemtype);

			if (item == NULL)
			{
				Py_DECREF(list);
				return NULL;
			}
			PyList_SET_ITEM(list, i, item);
		}
		return list;
	}

	return datum_via_output(value, typid);
}

/* ---------------------------------------------------------------------
 * Python -> PostgreSQL (row path)
 * ---------------------------------------------------------------------
 */

void
pyhost_init_column_conv(PyhostColumnConv *conv, Form_pg_attribute att)
{
	conv->typid = att->atttypid;
	conv->typmod = att->atttypmod;
	conv->attname = pstrdup(NameStr(att->attname));
	getTypeInputInfo(att->atttypid, &conv->typinput, &conv->typioparam);
	conv->inflinfo_ready = false;
	conv->mcxt = CurrentMemoryContext;
	conv->elem = NULL;
}

static bool
is_list(PyObject *obj)
{
	return PyList_Check(obj) || PyTuple_Check(obj);
}

/*
 * The values of nested lists, depth first, into elems/nulls (`depth` counts
 * the dimensions below this list); ERROR for sub-lists of unequal length.
 */
static void
flatten_list(PyObject *obj, int ndims, int depth, int *dims, Datum *elems, bool *nulls,
			 int *pos, PyhostColumnConv *conv)
{
	Py_ssize_t	n = PySequence_Size(obj);

	if (n != dims[depth])
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("multidimensional arrays must have sub-arrays with matching dimensions"),
				 errcontext("column \"%s\"", conv->attname)));
	for (Py_ssize_t i = 0; i < n; i++)
	{
		PyObject   *item = PySequence_GetItem(obj, i);

		if (item == NULL)
			pyhost_report_error("reading a list");
		if (depth + 1 < ndims)
		{
			if (!is_list(item))
			{
				Py_DECREF(item);
				ereport(ERROR,
						(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
						 errmsg("multidimensional arrays must have sub-arrays with matching dimensions"),
						 errcontext("column \"%s\"", conv->attname)));
			}
			flatten_list(item, ndims, depth + 1, dims, elems, nulls, pos, conv);
		}
		else
		{
			elems[*pos] = pyhost_python_to_datum(item, conv->elem, &nulls[*pos]);
			(*pos)++;
		}
		Py_DECREF(item);
	}
}

/*
 * Python list/tuple -> array of the column's element type; nested lists
 * (of a non-array element type) give a multidimensional array.
 */
static Datum
list_to_array(PyObject *obj, PyhostColumnConv *conv)
{
	int			dims[MAXDIM];
	int			lbs[MAXDIM];
	int			ndims = 0;
	int			total = 1;
	int			pos = 0;
	PyObject   *probe = obj;
	Datum	   *elems;
	bool	   *nulls;

	if (conv->elem == NULL)
	{
		Oid			elemtype = get_element_type(conv->typid);
		PyhostColumnConv *elem = MemoryContextAllocZero(conv->mcxt,
														sizeof(PyhostColumnConv));

		elem->typid = elemtype;
		elem->typmod = conv->typmod;
		elem->attname = conv->attname;
		elem->mcxt = conv->mcxt;
		getTypeInputInfo(elemtype, &elem->typinput, &elem->typioparam);
		get_typlenbyvalalign(elemtype, &conv->elemlen, &conv->elembyval, &conv->elemalign);
		conv->elem = elem;
	}
	/* the shape, from the first element at each level */
	for (;;)
	{
		Py_ssize_t	n = PySequence_Size(probe);

		if (ndims == MAXDIM)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("number of array dimensions exceeds the maximum allowed (%d)", MAXDIM)));
		dims[ndims] = (int) n;
		lbs[ndims] = 1;
		ndims++;
		total *= (int) n;
		if (n == 0)
			break;
		{
			PyObject   *first = PySequence_GetItem(probe, 0);
			bool		nested = first != NULL && is_list(first);

			Py_XDECREF(first);	/* obj keeps it alive */
			if (!nested)
				break;
			probe = first;
		}
	}
	if (total == 0)
		return PointerGetDatum(construct_empty_array(conv->elem->typid));
	elems = palloc(sizeof(Datum) * total);
	nulls = palloc(sizeof(bool) * total);
	flatten_list(obj, ndims, 0, dims, elems, nulls, &pos, conv);
	return PointerGetDatum(construct_md_array(elems, nulls, ndims, dims, lbs, conv->elem->typid,
											  conv->elemlen, conv->elembyval, conv->elemalign));
}

/* A dict as hstore text ("k"=>"v", None as NULL), which multicorn2 sends for any dict. */
static PyObject *
dict_to_hstore_text(PyObject *dict)
{
	PyObject   *key;
	PyObject   *value;
	Py_ssize_t	i = 0;
	StringInfoData buf;
	PyObject   *res;

	initStringInfo(&buf);
	while (PyDict_Next(dict, &i, &key, &value))
	{
		PyObject   *parts[2] = {key, value};

		if (buf.len > 0)
			appendStringInfoString(&buf, ", ");
		for (int k = 0; k < 2; k++)
		{
			PyObject   *s;
			const char *u;

			if (k == 1)
				appendStringInfoString(&buf, "=>");
			if (k == 1 && parts[k] == Py_None)
			{
				appendStringInfoString(&buf, "NULL");
				continue;
			}
			s = PyObject_Str(parts[k]);
			u = s ? PyUnicode_AsUTF8(s) : NULL;
			if (u == NULL)
			{
				Py_XDECREF(s);
				return NULL;
			}
			appendStringInfoChar(&buf, '"');
			for (; *u; u++)
			{
				if (*u == '"' || *u == '\\')
					appendStringInfoChar(&buf, '\\');
				appendStringInfoChar(&buf, *u);
			}
			appendStringInfoChar(&buf, '"');
			Py_DECREF(s);
		}
	}
	res = PyUnicode_FromStringAndSize(buf.data, buf.len);
	pfree(buf.data);
	return res;
}

static Datum
via_input(PyhostColumnConv *conv, const char *s)
{
	if (!conv->inflinfo_ready)
	{
		fmgr_info(conv->typinput, &conv->inflinfo);
		conv->inflinfo_ready = true;
	}
	return InputFunctionCall(&conv->inflinfo, (char *) s, conv->typioparam, conv->typmod);
}

/* str(obj) (or json.dumps for dict/list/tuple going to json) through the input function. */
static Datum
via_str(PyObject *obj, PyhostColumnConv *conv)
{
	PyObject   *s;
	const char *utf8;
	Datum		d;

	if ((conv->typid == JSONOID || conv->typid == JSONBOID) &&
		(PyDict_Check(obj) || PyList_Check(obj) || PyTuple_Check(obj) ||
		 PyBool_Check(obj) || PyLong_Check(obj) || PyFloat_Check(obj)))
		s = PyObject_CallFunctionObjArgs(json_dumps, obj, NULL);
	else if (PyDict_Check(obj))
		s = dict_to_hstore_text(obj);
	else if (PyBytes_Check(obj))
		s = PyUnicode_FromEncodedObject(obj, "utf-8", "strict");
	else
		s = PyObject_Str(obj);
	if (s == NULL)
		pyhost_report_error("converting a value");
	utf8 = PyUnicode_AsUTF8(s);
	if (utf8 == NULL)
	{
		Py_DECREF(s);
		pyhost_report_error("converting a value");
	}
	PG_TRY();
	{
		d = via_input(conv, utf8);
	}
	PG_FINALLY();
	{
		Py_DECREF(s);
	}
	PG_END_TRY();
	return d;
}

static void conversion_error(PyhostColumnConv *conv, PyObject *obj) pg_attribute_noreturn();

static void
conversion_error(PyhostColumnConv *conv, PyObject *obj)
{
	ereport(ERROR,
			(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
			 errmsg("value of type %s does not fit column \"%s\" of type %s",
					Py_TYPE(obj)->tp_name, conv->attname, format_type_be(conv->typid)),
			 errhint("Return a value that the column's type accepts, or change the column's type.")));
}

static Datum
datetime_to_timestamp(PyObject *obj, PyhostColumnConv *conv, bool want_tz)
{
	struct pg_tm tm;
	Timestamp	ts;
	PyObject   *tzinfo = PyDateTime_DATE_GET_TZINFO(obj);

	if (want_tz && tzinfo == Py_None)
		return via_str(obj, conv);	/* naive: the session's time zone decides */

	memset(&tm, 0, sizeof(tm));
	tm.tm_year = PyDateTime_GET_YEAR(obj);
	tm.tm_mon = PyDateTime_GET_MONTH(obj);
	tm.tm_mday = PyDateTime_GET_DAY(obj);
	tm.tm_hour = PyDateTime_DATE_GET_HOUR(obj);
	tm.tm_min = PyDateTime_DATE_GET_MINUTE(obj);
	tm.tm_sec = PyDateTime_DATE_GET_SECOND(obj);
	if (tm2timestamp(&tm, PyDateTime_DATE_GET_MICROSECOND(obj), NULL, &ts) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range for column \"%s\"", conv->attname)));
	if (tzinfo != Py_None)
	{
		PyObject   *off = PyObject_CallMethod(obj, "utcoffset", NULL);

		if (off == NULL)
			pyhost_report_error("datetime.utcoffset");
		if (off != Py_None)
		{
			int64		us = ((int64) PyDateTime_DELTA_GET_DAYS(off) * 86400 +
							  PyDateTime_DELTA_GET_SECONDS(off)) * USECS_PER_SEC +
				PyDateTime_DELTA_GET_MICROSECONDS(off);

			/* aware -> UTC; for plain timestamp keep the wall-clock of UTC */
			ts -= us;
		}
		Py_DECREF(off);
	}
	return TimestampGetDatum(ts);
}

Datum
pyhost_python_to_datum(PyObject *obj, PyhostColumnConv *conv, bool *isnull)
{
	*isnull = false;
	if (obj == Py_None)
	{
		*isnull = true;
		return (Datum) 0;
	}

	switch (conv->typid)
	{
		case BOOLOID:
			if (PyBool_Check(obj) || PyLong_Check(obj))
				return BoolGetDatum(PyObject_IsTrue(obj));
			break;
		case INT2OID:
		case INT4OID:
		case INT8OID:
			if (PyLong_Check(obj))
			{
				int			overflow;
				long long	v = PyLong_AsLongLongAndOverflow(obj, &overflow);

				if (overflow ||
					(conv->typid == INT2OID && (v < PG_INT16_MIN || v > PG_INT16_MAX)) ||
					(conv->typid == INT4OID && (v < PG_INT32_MIN || v > PG_INT32_MAX)))
					ereport(ERROR,
							(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
							 errmsg("value out of range for column \"%s\" of type %s",
									conv->attname, format_type_be(conv->typid))));
				if (conv->typid == INT2OID)
					return Int16GetDatum((int16) v);
				if (conv->typid == INT4OID)
					return Int32GetDatum((int32) v);
				return Int64GetDatum((int64) v);
			}
			break;
		case FLOAT4OID:
		case FLOAT8OID:
			if (PyFloat_Check(obj) || PyLong_Check(obj))
			{
				double		v = PyFloat_AsDouble(obj);

				if (v == -1.0 && PyErr_Occurred())
					pyhost_report_error("converting a float");
				return conv->typid == FLOAT4OID ? Float4GetDatum((float4) v) : Float8GetDatum(v);
			}
			break;
		case TEXTOID:
		case VARCHAROID:
			/* varchar(n) goes through its input function for the length check */
			if (PyUnicode_Check(obj) && (conv->typid == TEXTOID || conv->typmod < 0))
			{
				Py_ssize_t	len;
				const char *s = PyUnicode_AsUTF8AndSize(obj, &len);

				if (s == NULL)
					pyhost_report_error("converting a string");
				return PointerGetDatum(cstring_to_text_with_len(s, (int) len));
			}
			break;
		case BYTEAOID:
			if (PyBytes_Check(obj) || PyByteArray_Check(obj) || PyMemoryView_Check(obj))
			{
				Py_buffer	view;
				bytea	   *b;

				if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
					pyhost_report_error("reading a bytes value");
				b = (bytea *) palloc(VARHDRSZ + view.len);
				SET_VARSIZE(b, VARHDRSZ + view.len);
				memcpy(VARDATA(b), view.buf, view.len);
				PyBuffer_Release(&view);
				return PointerGetDatum(b);
			}
			break;
		case UUIDOID:
			if (PyObject_IsInstance(obj, uuid_class) == 1)
			{
				PyObject   *bytes = PyObject_GetAttrString(obj, "bytes");
				pg_uuid_t  *u;

				if (bytes == NULL || !PyBytes_Check(bytes) || PyBytes_GET_SIZE(bytes) != UUID_LEN)
				{
					Py_XDECREF(bytes);
					pyhost_report_error("reading uuid.UUID.bytes");
				}
				u = (pg_uuid_t *) palloc(sizeof(pg_uuid_t));
				memcpy(u->data, PyBytes_AS_STRING(bytes), UUID_LEN);
				Py_DECREF(bytes);
				return UUIDPGetDatum(u);
			}
			if ((PyBytes_Check(obj) && PyBytes_GET_SIZE(obj) == UUID_LEN))
			{
				pg_uuid_t  *u = (pg_uuid_t *) palloc(sizeof(pg_uuid_t));

				memcpy(u->data, PyBytes_AS_STRING(obj), UUID_LEN);
				return UUIDPGetDatum(u);
			}
			break;
		case TIMESTAMPTZOID:
		case TIMESTAMPOID:
			if (PyDateTime_Check(obj))
				return datetime_to_timestamp(obj, conv, conv->typid == TIMESTAMPTZOID);
			break;
		case DATEOID:
			if (PyDate_Check(obj) && !PyDateTime_Check(obj))
				return DateADTGetDatum(date2j(PyDateTime_GET_YEAR(obj), PyDateTime_GET_MONTH(obj),
											  PyDateTime_GET_DAY(obj)) - POSTGRES_EPOCH_JDATE);
			break;
		default:
			break;
	}

	if ((PyList_Check(obj) || PyTuple_Check(obj)) && type_is_array(conv->typid))
	{
		PyObject   *seq = PySequence_Fast(obj, "array");
		Datum		d;

		PG_TRY();
		{
			d = list_to_array(seq, conv);
		}
		PG_FINALLY();
		{
			Py_DECREF(seq);
		}
		PG_END_TRY();
		return d;
	}
	if (PyBytes_Check(obj) && conv->typid != BYTEAOID && conv->typid != TEXTOID &&
		conv->typid != VARCHAROID && conv->typid != BPCHAROID)
		conversion_error(conv, obj);
	return via_str(obj, conv);
}
