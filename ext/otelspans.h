/*-------------------------------------------------------------------------
 *
 * otelspans.h
 *		  Shared declarations of the otelspans host: a PostgreSQL extension
 *		  that runs foreign-data wrappers written in Python on the Multicorn2
 *		  API, with a bulk path for Arrow data.
 *
 * The extension is split by concern, like contrib/postgres_fdw:
 *	fdw.c		FDW callbacks (planner and executor), wired in one handler
 *	quals.c		restriction clauses -> qual descriptors -> Python Qual objects
 *	options.c	option validation, option gathering, the per-table instance cache
 *	python.c	the embedded interpreter, errors, signals, value conversion
 *	arrow.c		Arrow C Data Interface -> tuples, column by column
 *	functions.c	SQL-callable functions (the Python call bridge)
 *	upper.c		grouping, aggregates, ORDER BY and LIMIT pushed to the wrapper
 *	modify.c	INSERT/UPDATE/DELETE through the writable API
 *	xact.c		transaction and subtransaction hooks, end_scan/end_modify
 *	import.c	IMPORT FOREIGN SCHEMA through import_schema
 *
 * IDENTIFICATION
 *		  ext/otelspans.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef OTELSPANS_H
#define OTELSPANS_H

/* Python.h must come first: it sets feature macros that other headers read. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "postgres.h"

#include "access/tupdesc.h"
#include "commands/explain.h"
#include "fmgr.h"
#include "executor/tuptable.h"
#include "nodes/execnodes.h"
#include "nodes/plannodes.h"
#include "nodes/pathnodes.h"
#include "nodes/pg_list.h"
#include "utils/palloc.h"

/* ---------------------------------------------------------------------
 * python.c
 * ---------------------------------------------------------------------
 */

/* Start the interpreter on first use in this backend (idempotent). */
extern void pyhost_ensure_initialized(void);

/*
 * Report the pending Python exception as an ERROR (never returns).
 * `context` says what the host was doing ("execute", "get_rel_size", ...).
 * The message is the exception's str(); hint and detail come from
 * multicorn-style log_to_postgres errors; the traceback goes to the log.
 * SQLSTATE: query_canceled for KeyboardInterrupt, else the exception's
 * `sqlstate` attribute when it has one, else external_routine_exception.
 */
extern void pyhost_report_error(const char *context) pg_attribute_noreturn();

/* Raise ERROR if `obj` is NULL (a Python call failed); else return it. */
extern PyObject *pyhost_check(PyObject *obj, const char *context);

/*
 * Call around long-running Python code so that a query cancel or a
 * statement_timeout interrupts it (the SIGINT handler only trips Python
 * while `pyhost_in_python` is set).  Calls nest.
 */
extern void pyhost_enter(void);
extern void pyhost_leave(void);

/* Datum -> Python object, for qual values and parameters (new reference). */
extern PyObject *pyhost_datum_to_python(Datum value, bool isnull, Oid typid);

/*
 * Python object -> Datum of type `typid` (row path).  Fast paths for the
 * common types; anything else goes through str() and the type's input
 * function.  The result is allocated in CurrentMemoryContext.
 */
typedef struct PyhostColumnConv
{
	Oid			typid;
	int32		typmod;
	Oid			typinput;		/* input function, for the slow path */
	Oid			typioparam;
	FmgrInfo	inflinfo;
	bool		inflinfo_ready;
	const char *attname;
	MemoryContext mcxt;			/* where lazily built parts live */
	struct PyhostColumnConv *elem;	/* arrays: conversion of the elements */
	int16		elemlen;
	bool		elembyval;
	char		elemalign;
} PyhostColumnConv;

extern void pyhost_init_column_conv(PyhostColumnConv *conv, Form_pg_attribute att);
extern Datum pyhost_python_to_datum(PyObject *obj, PyhostColumnConv *conv, bool *isnull);

/* Module objects of the Multicorn2-compatible API (borrowed references). */
extern PyObject *pyhost_api_module(void);

/* ---------------------------------------------------------------------
 * options.c
 * ---------------------------------------------------------------------
 */

/*
 * The wrapper instance of a foreign table (borrowed; rebuilt when the
 * options or the columns changed).  `column_names`, if not NULL, receives
 * the list of column names in table order (borrowed).
 */
extern PyObject *pyhost_get_instance(Oid foreigntableid, PyObject **column_names);

/* option_rights.c: superuser-only and server-only options; the lake's role. */
extern void pyhost_check_option_rights(const char *name, Oid catalog);
extern char *pyhost_extension_owner(void);
/* The options of the current user's mapping, else PUBLIC's, else NIL. */
extern List *user_mapping_options(Oid serverid);

/* ---------------------------------------------------------------------
 * xact.c
 * ---------------------------------------------------------------------
 */

/*
 * The backend uses `instance` (of table `relid`) in the current transaction:
 * the first time, begin(serializable); then sub_begin(level) for each
 * savepoint level it has not seen.  Commit, rollback and savepoint ends
 * reach the instances that joined.
 */
extern void pyhost_xact_use(Oid relid, PyObject *instance);

/* Call an optional no-argument hook (end_scan, end_modify); ERROR if it raises. */
extern void pyhost_call_hook(PyObject *instance, const char *name);

/* ---------------------------------------------------------------------
 * modify.c, import.c: fill in their callbacks of the FDW routine
 * ---------------------------------------------------------------------
 */
struct FdwRoutine;
extern void pyhost_modify_routine(struct FdwRoutine *routine);
extern void pyhost_import_routine(struct FdwRoutine *routine);

/* ---------------------------------------------------------------------
 * quals.c
 * ---------------------------------------------------------------------
 */

/* What the value side of a qual is. */
typedef enum QualValueKind
{
	QUAL_VALUE_EXPR,			/* an expression, evaluated at execution */
	QUAL_VALUE_IS_NULL,			/* col IS NULL: ('=', None) */
	QUAL_VALUE_IS_NOT_NULL		/* col IS NOT NULL: ('<>', None) */
} QualValueKind;

/* How a list operator combines: plain, = ANY(...), <> ALL(...). */
typedef enum QualListKind
{
	QUAL_LIST_NONE,
	QUAL_LIST_ANY,
	QUAL_LIST_ALL
} QualListKind;

/* One restriction `column op value` that the wrapper is offered. */
typedef struct QualDesc
{
	AttrNumber	attnum;
	char	   *opname;
	QualListKind listkind;
	QualValueKind valkind;
	Expr	   *expr;			/* value side when QUAL_VALUE_EXPR */
	Oid			valtype;		/* its type */
	int			exprindex;		/* its index in fdw_exprs (execution only) */
	RestrictInfo *rinfo;		/* where it came from (planning only) */
} QualDesc;

/* Clauses (RestrictInfos or bare) -> QualDescs of those we can offer. */
extern List *pyhost_extract_quals(PlannerInfo *root, RelOptInfo *baserel, List *clauses);

/*
 * QualDesc <-> fdw_private.  The value expression goes to fdw_exprs; the
 * descriptor keeps its index there (see QualPrivateIndex in quals.c).
 */
extern List *pyhost_qual_to_private(QualDesc *qual, List **fdw_exprs);
extern QualDesc *pyhost_qual_from_private(List *private, List *fdw_exprs);

/*
 * Python list of Qual objects.  `values`/`nulls` hold the evaluated value
 * of each qual's expression (ignored for null tests); `skip[i]` leaves a
 * qual out (value not known at planning time).
 */
extern PyObject *pyhost_quals_to_python(List *quals, TupleDesc tupdesc,
										Datum *values, bool *nulls, bool *skip);

/*
 * Quals whose value is known while planning, as Python objects: constants,
 * and with `root` also what estimate_expression_value folds (stable
 * functions such as now(), bound parameters).
 */
extern PyObject *pyhost_plan_quals_to_python(PlannerInfo *root, List *quals, TupleDesc tupdesc);

/* ---------------------------------------------------------------------
 * arrow.c
 * ---------------------------------------------------------------------
 */

typedef struct ArrowScan ArrowScan;

/*
 * Start reading Arrow data returned by a wrapper's execute().
 * `source` is either an object with __arrow_c_stream__ (pyarrow Table,
 * RecordBatchReader, ...), or `first_batch` + `rest` where first_batch has
 * __arrow_c_array__ and `rest` is the iterator that yields more such batches.
 * `needed[i]` says whether attribute i (0-based) of `tupdesc` is projected;
 * columns that are not needed are returned as NULL and never converted.
 * Arrow columns are matched to table columns by name; a projected column
 * missing from the data or of an incompatible type is an ERROR naming the
 * column and both types.  Everything is released when `mcxt` is reset or
 * deleted, so an ERROR anywhere leaks nothing.
 */
extern ArrowScan *arrow_scan_begin_stream(PyObject *source, TupleDesc tupdesc,
										  const bool *needed, MemoryContext mcxt);
extern ArrowScan *arrow_scan_begin_batches(PyObject *first_batch, PyObject *rest,
										   TupleDesc tupdesc, const bool *needed,
										   MemoryContext mcxt);

/*
 * Fill `slot` with the next row (ExecStoreVirtualTuple) and return true, or
 * return false at the end.  Rows are converted in chunks, column by column;
 * values of pass-by-reference types live in a chunk buffer and stay valid
 * until the next call (as the executor's contract for a scan slot asks).
 */
extern bool arrow_scan_next(ArrowScan *scan, TupleTableSlot *slot);

/* Release the current batch, the stream and the Python objects now. */
extern void arrow_scan_end(ArrowScan *scan);

/* Does this Python object offer Arrow data? */
extern bool arrow_has_stream(PyObject *obj);
extern bool arrow_has_array(PyObject *obj);

/* ---------------------------------------------------------------------
 * fdw.c
 * ---------------------------------------------------------------------
 */

/* Planning state of one foreign relation (baserel->fdw_private). */
typedef struct PyhostRelInfo
{
	Oid			foreigntableid;
	PyObject   *instance;		/* the wrapper, borrowed from the instance cache */
	TupleDesc	tupdesc;		/* the table's columns */
	Bitmapset  *attrs_used;		/* columns the query needs, attnum-offset */
	double		rows;
	int			width;
	double		total_cost;		/* of the unparameterized scan, or -1: computed */
} PyhostRelInfo;

/* ---------------------------------------------------------------------
 * upper.c
 * ---------------------------------------------------------------------
 */

/* Define the otelspans.pushdown_upper setting (from _PG_init). */
extern void pyhost_upper_init(void);

/*
 * GetForeignUpperPaths: grouping with aggregates, and ORDER BY ... LIMIT,
 * offered to wrappers with can_pushdown_upper()/execute_upper().
 */
extern void pyhostGetForeignUpperPaths(PlannerInfo *root, UpperRelationKind stage,
									   RelOptInfo *input_rel, RelOptInfo *output_rel,
									   void *extra);

/* GetForeignPlan of such a path (foreignrel is an upper relation). */
extern ForeignScan *pyhost_upper_plan(PlannerInfo *root, RelOptInfo *foreignrel,
									  ForeignPath *best_path, List *tlist, Plan *outer_plan);

/* The executor callbacks of an upper scan (ForeignScan with scanrelid 0). */
extern void pyhost_upper_begin(ForeignScanState *node, int eflags);
extern TupleTableSlot *pyhost_upper_iterate(ForeignScanState *node);
extern void pyhost_upper_rescan(ForeignScanState *node);
extern void pyhost_upper_end(ForeignScanState *node);
extern void pyhost_upper_explain(ForeignScanState *node, ExplainState *es);

#endif							/* OTELSPANS_H */
