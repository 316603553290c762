/*-------------------------------------------------------------------------
 *
 * fdw.c
 *		  Foreign-data wrapper callbacks of the otelspans host.
 *
 * The host runs a Python wrapper class written on the Multicorn2 API (see
 * otelspans_fdw/multicorn_api.py).  Planning asks the wrapper for its size
 * estimate, its path keys (which become parameterized paths, so that a join
 * with a native table plans a nested loop that hands the outer value to the
 * wrapper as a qual), whether it can sort and whether it can limit.
 * Execution evaluates the offered quals' values, calls execute() and turns
 * what it returns into tuples: Arrow data column by column in C (arrow.c),
 * anything else row by row (python.c).
 *
 * IDENTIFICATION
 *		  ext/fdw.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "access/table.h"
#include "catalog/pg_collation.h"
#include "commands/explain.h"
#include "foreign/fdwapi.h"
#include "foreign/foreign.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/planmain.h"
#include "optimizer/restrictinfo.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/ruleutils.h"

PG_MODULE_MAGIC;

extern char *pyhost_venv;
extern char *pyhost_python_path;

/* Slots of ForeignScan.fdw_private. */
enum FdwScanPrivateIndex
{
	FdwScanPrivateQuals,		/* List of qual descriptors (see quals.c) */
	FdwScanPrivateColumns,		/* List of Integer: attnums to return */
	FdwScanPrivateSortKeys,		/* List of sort key descriptors */
	FdwScanPrivateLimit,		/* Integer: LIMIT pushed down, or -1 */
	FdwScanPrivateQualTexts		/* List of String: quals as text, for EXPLAIN VERBOSE */
};

/* Slots of a sort key descriptor (also ForeignPath.fdw_private items). */
enum SortKeyPrivateIndex
{
	SortKeyPrivateAttnum,		/* Integer */
	SortKeyPrivateReversed,		/* Boolean */
	SortKeyPrivateNullsFirst,	/* Boolean */
	SortKeyPrivateCollation		/* String: collation name or "" */
};

/* Execution state of one foreign scan. */
typedef struct PyhostScanState
{
	MemoryContext scan_cxt;		/* Python references and Arrow batches */
	PyObject   *instance;		/* borrowed from the instance cache */
	List	   *quals;			/* QualDesc * */
	List	   *qual_exprs;		/* ExprState * per fdw_expr */
	PyObject   *py_columns;		/* list of projected column names */
	PyObject   *py_sortkeys;	/* list of SortKey or NULL */
	int			limit;
	bool		started;
	PyObject   *result;			/* what execute() returned */
	PyObject   *iterator;		/* row path */
	ArrowScan  *arrow;			/* bulk path */
	int			natts;
	bool	   *needed;			/* per attribute: projected? */
	int		   *needed_attnos;	/* 0-based indexes of projected attributes */
	int			nneeded;
	PyObject  **keys;			/* per attribute: name as str, for mappings */
	PyhostColumnConv *convs;
	PyObject   *column_names;	/* all names, table order (borrowed) */
} PyhostScanState;

void		_PG_init(void);

PG_FUNCTION_INFO_V1(otelspans_fdw_handler);

/* FDW callback routines */
static void pyhostGetForeignRelSize(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid);
static void pyhostGetForeignPaths(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid);
static ForeignScan *pyhostGetForeignPlan(PlannerInfo *root, RelOptInfo *baserel,
										 Oid foreigntableid, ForeignPath *best_path,
										 List *tlist, List *scan_clauses, Plan *outer_plan);
static void pyhostBeginForeignScan(ForeignScanState *node, int eflags);
static TupleTableSlot *pyhostIterateForeignScan(ForeignScanState *node);
static void pyhostReScanForeignScan(ForeignScanState *node);
static void pyhostEndForeignScan(ForeignScanState *node);
static void pyhostExplainForeignScan(ForeignScanState *node, ExplainState *es);

/* Helper functions */
static PyObject *column_name_list(Bitmapset *attrs_used, TupleDesc tupdesc);
static PyObject *sortkeys_to_python(List *sortkeys, TupleDesc tupdesc);
static void scan_release(void *arg);

void
_PG_init(void)
{
	DefineCustomStringVariable("otelspans.python_venv",
							   "Python environment whose site-packages the wrappers import from.",
							   "Read when the interpreter starts in a backend.",
							   &pyhost_venv, OTELSPANS_VENV, PGC_SUSET, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("otelspans.python_path",
							   "Directories put first on sys.path (colon-separated).",
							   "Read when the interpreter starts in a backend.",
							   &pyhost_python_path, "", PGC_SUSET, 0,
							   NULL, NULL, NULL);
	pyhost_upper_init();
	MarkGUCPrefixReserved("otelspans");
}

Datum
otelspans_fdw_handler(PG_FUNCTION_ARGS)
{
	FdwRoutine *routine = makeNode(FdwRoutine);

	/* Planning */
	routine->GetForeignRelSize = pyhostGetForeignRelSize;
	routine->GetForeignPaths = pyhostGetForeignPaths;
	routine->GetForeignPlan = pyhostGetForeignPlan;
	routine->GetForeignUpperPaths = pyhostGetForeignUpperPaths;

	/* Execution */
	routine->BeginForeignScan = pyhostBeginForeignScan;
	routine->IterateForeignScan = pyhostIterateForeignScan;
	routine->ReScanForeignScan = pyhostReScanForeignScan;
	routine->EndForeignScan = pyhostEndForeignScan;

	/* EXPLAIN */
	routine->ExplainForeignScan = pyhostExplainForeignScan;

	/* The writable API (modify.c) and IMPORT FOREIGN SCHEMA (import.c) */
	pyhost_modify_routine(routine);
	pyhost_import_routine(routine);

	PG_RETURN_POINTER(routine);
}

/* ---------------------------------------------------------------------
 * Planning
 * ---------------------------------------------------------------------
 */

/*
 * Attribute numbers (Integer nodes) of the columns a query uses, in table
 * order; a whole-row reference uses them all.
 */
static List *
used_attnums(Bitmapset *attrs_used, TupleDesc tupdesc)
{
	List	   *res = NIL;
	bool		whole_row = bms_is_member(0 - FirstLowInvalidHeapAttributeNumber, attrs_used);

	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);

		if (att->attisdropped)
			continue;
		if (whole_row ||
			bms_is_member(att->attnum - FirstLowInvalidHeapAttributeNumber, attrs_used))
			res = lappend(res, makeInteger(att->attnum));
	}
	return res;
}

static PyObject *
column_name_list(Bitmapset *attrs_used, TupleDesc tupdesc)
{
	PyObject   *list = PyList_New(0);
	ListCell   *lc;

	foreach(lc, used_attnums(attrs_used, tupdesc))
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, intVal(lfirst(lc)) - 1);
		PyObject   *name = PyUnicode_FromString(NameStr(att->attname));

		PyList_Append(list, name);
		Py_DECREF(name);
	}
	return list;
}

static TupleDesc
table_tupdesc(Oid relid)
{
	Relation	rel = table_open(relid, NoLock);
	TupleDesc	tupdesc = CreateTupleDescCopy(RelationGetDescr(rel));

	table_close(rel, NoLock);
	return tupdesc;
}

/*
 * Rows and width come from the wrapper's get_rel_size, given the quals whose
 * values are known now and the columns the query needs.
 */
static void
pyhostGetForeignRelSize(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid)
{
	PyhostRelInfo *info = palloc0(sizeof(PyhostRelInfo));
	TupleDesc	tupdesc = table_tupdesc(foreigntableid);
	PyObject   *instance;
	PyObject   *quals;
	PyObject   *columns;
	PyObject   *res;
	ListCell   *lc;

	info->foreigntableid = foreigntableid;
	info->tupdesc = tupdesc;
	baserel->fdw_private = info;

	pull_varattnos((Node *) baserel->reltarget->exprs, baserel->relid, &info->attrs_used);
	foreach(lc, baserel->baserestrictinfo)
		pull_varattnos((Node *) lfirst_node(RestrictInfo, lc)->clause, baserel->relid,
					   &info->attrs_used);

	instance = info->instance = pyhost_get_instance(foreigntableid, NULL);
	pyhost_xact_use(foreigntableid, instance);
	quals = pyhost_plan_quals_to_python(root, pyhost_extract_quals(root, baserel,
																   baserel->baserestrictinfo),
										tupdesc);
	columns = column_name_list(info->attrs_used, tupdesc);
	pyhost_enter();
	res = PyObject_CallMethod(instance, "get_rel_size", "OO", quals, columns);
	pyhost_leave();
	Py_DECREF(quals);
	Py_DECREF(columns);
	pyhost_check(res, "get_rel_size");
	{
		double		rows;
		int			width;
		double		total_cost = -1.0;

		/*
		 * A third element (this host's extension of the Multicorn2 API) is the
		 * total cost of a scan without parameters: a wrapper that cannot run
		 * such a scan makes it lose to the parameterized paths while its row
		 * estimate stays sane for the joins above.
		 */
		if (!PyArg_ParseTuple(res, "di|d", &rows, &width, &total_cost))
		{
			Py_DECREF(res);
			pyhost_report_error("get_rel_size must return (rows, width[, total_cost])");
		}
		info->rows = rows;
		info->width = width;
		info->total_cost = total_cost;
	}
	Py_DECREF(res);
	baserel->rows = clamp_row_est(info->rows);
	baserel->reltarget->width = info->width;
}

/* A clause usable as a join key: own column `attnum` = expression of other rels. */
static bool
is_key_clause(PlannerInfo *root, RelOptInfo *baserel, RestrictInfo *rinfo, AttrNumber attnum)
{
	List	   *quals = pyhost_extract_quals(root, baserel, list_make1(rinfo));
	QualDesc   *q;

	if (quals == NIL)
		return false;
	q = linitial(quals);
	return q->attnum == attnum && q->listkind == QUAL_LIST_NONE &&
		q->valkind == QUAL_VALUE_EXPR && strcmp(q->opname, "=") == 0 &&
		!bms_is_empty(pull_varnos(root, (Node *) q->expr));
}

static bool
ec_member_is_column(PlannerInfo *root, RelOptInfo *rel, EquivalenceClass *ec,
					EquivalenceMember *em, void *arg)
{
	Node	   *expr = strip_implicit_coercions((Node *) em->em_expr);
	AttrNumber	attnum = *(AttrNumber *) arg;

	return IsA(expr, Var) && ((Var *) expr)->varno == rel->relid &&
		((Var *) expr)->varattno == attnum && ((Var *) expr)->varlevelsup == 0;
}

/*
 * Join clauses that give column `attnum` by equality from other relations:
 * explicit ones in joininfo and those implied by equivalence classes (USING,
 * a = b AND b = c, ...).
 */
static List *
key_clauses_for_column(PlannerInfo *root, RelOptInfo *baserel, AttrNumber attnum)
{
	List	   *res = NIL;
	ListCell   *lc;

	foreach(lc, baserel->joininfo)
	{
		RestrictInfo *rinfo = lfirst_node(RestrictInfo, lc);

		if (is_key_clause(root, baserel, rinfo, attnum))
			res = lappend(res, rinfo);
	}
	if (baserel->has_eclass_joins)
	{
		List	   *implied = generate_implied_equalities_for_column(root, baserel,
																	 ec_member_is_column,
																	 &attnum, NULL);

		foreach(lc, implied)
		{
			RestrictInfo *rinfo = lfirst_node(RestrictInfo, lc);

			if (is_key_clause(root, baserel, rinfo, attnum))
				res = lappend(res, rinfo);
		}
	}
	return res;
}

static AttrNumber
attnum_by_name(TupleDesc tupdesc, const char *name)
{
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);

		if (!att->attisdropped && strcmp(NameStr(att->attname), name) == 0)
			return att->attnum;
	}
	return InvalidAttrNumber;
}

/*
 * Parameterized paths from get_path_keys(): for a key (columns, rows), every
 * combination of one join clause per column whose other sides come from the
 * same outer relations gives a path needing those relations, expected to
 * return `rows` rows per outer row.
 */
static void
add_parameterized_paths(PlannerInfo *root, RelOptInfo *baserel, PyObject *instance,
						TupleDesc tupdesc, Cost startup_cost, double per_row)
{
	PyObject   *keys;
	PyObject   *iter;
	PyObject   *item;

	pyhost_enter();
	keys = PyObject_CallMethod(instance, "get_path_keys", NULL);
	pyhost_leave();
	pyhost_check(keys, "get_path_keys");
	iter = PyObject_GetIter(keys);
	Py_DECREF(keys);
	pyhost_check(iter, "get_path_keys must return a list");

	while ((item = PyIter_Next(iter)) != NULL)
	{
		PyObject   *cols;
		double		rows;
		Relids		required_outer = NULL;
		bool		usable = true;
		Py_ssize_t	ncols;

		if (!PyArg_ParseTuple(item, "Od", &cols, &rows) || !PySequence_Check(cols))
		{
			Py_DECREF(item);
			Py_DECREF(iter);
			if (!PyErr_Occurred())
				PyErr_SetString(PyExc_TypeError, "path keys are ((column, ...), rows)");
			pyhost_report_error("get_path_keys");
		}
		ncols = PySequence_Size(cols);
		for (Py_ssize_t i = 0; i < ncols && usable; i++)
		{
			PyObject   *name = PySequence_GetItem(cols, i);
			const char *s = name && PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
			AttrNumber	attnum = s ? attnum_by_name(tupdesc, s) : InvalidAttrNumber;
			List	   *clauses;

			Py_XDECREF(name);
			PyErr_Clear();
			if (attnum == InvalidAttrNumber)
			{
				usable = false;
				break;
			}
			clauses = key_clauses_for_column(root, baserel, attnum);
			if (clauses == NIL)
				usable = false;
			else
			{
				RestrictInfo *rinfo = linitial(clauses);

				required_outer = bms_union(required_outer,
										   bms_difference(rinfo->clause_relids, baserel->relids));
			}
		}
		Py_DECREF(item);
		if (usable && !bms_is_empty(required_outer) && ncols > 0)
		{
			ForeignPath *path;

			rows = clamp_row_est(rows);
			path = create_foreignscan_path(root, baserel, NULL, rows, startup_cost,
										   Max(startup_cost, rows * per_row), NIL,
										   required_outer, NULL, NIL);
			add_path(baserel, (Path *) path);
		}
	}
	Py_DECREF(iter);
	if (PyErr_Occurred())
		pyhost_report_error("get_path_keys");
}

/*
 * The query's ORDER BY as sort keys on our columns, or NIL if some item is
 * not a plain column of this table.
 */
static List *
query_sortkeys(PlannerInfo *root, RelOptInfo *baserel)
{
	List	   *res = NIL;
	ListCell   *lc;

	foreach(lc, root->query_pathkeys)
	{
		PathKey    *pk = lfirst(lc);
		EquivalenceClass *ec = pk->pk_eclass;
		Var		   *found = NULL;
		ListCell   *lc2;

		if (ec->ec_has_volatile)
			return NIL;
		foreach(lc2, ec->ec_members)
		{
			EquivalenceMember *em = lfirst(lc2);
			Node	   *expr = strip_implicit_coercions((Node *) em->em_expr);

			if (IsA(expr, Var) && ((Var *) expr)->varno == baserel->relid &&
				((Var *) expr)->varattno > 0 && ((Var *) expr)->varlevelsup == 0)
			{
				found = (Var *) expr;
				break;
			}
		}
		if (found == NULL)
			return NIL;
		res = lappend(res, list_make4(makeInteger(found->varattno),
									  makeBoolean(pk->pk_strategy == BTGreaterStrategyNumber),
									  makeBoolean(pk->pk_nulls_first),
									  /* None for the default collation, as multicorn2 */
									  makeString(OidIsValid(ec->ec_collation) &&
												 ec->ec_collation != DEFAULT_COLLATION_OID ?
												 get_collation_name(ec->ec_collation) : "")));
	}
	return res;
}

static PyObject *
sortkeys_to_python(List *sortkeys, TupleDesc tupdesc)
{
	PyObject   *cls;
	PyObject   *list;
	ListCell   *lc;

	if (sortkeys == NIL)
		return NULL;
	cls = pyhost_check(PyObject_GetAttrString(pyhost_api_module(), "SortKey"), "SortKey");
	list = PyList_New(0);
	foreach(lc, sortkeys)
	{
		List	   *sk = lfirst(lc);
		int			attnum = intVal(list_nth(sk, SortKeyPrivateAttnum));
		const char *coll = strVal(list_nth(sk, SortKeyPrivateCollation));
		PyObject   *key;

		key = PyObject_CallFunction(cls, "siOOz",
									NameStr(TupleDescAttr(tupdesc, attnum - 1)->attname), attnum,
									boolVal(list_nth(sk, SortKeyPrivateReversed)) ? Py_True : Py_False,
									boolVal(list_nth(sk, SortKeyPrivateNullsFirst)) ? Py_True : Py_False,
									*coll ? coll : NULL);
		pyhost_check(key, "SortKey()");
		PyList_Append(list, key);
		Py_DECREF(key);
	}
	Py_DECREF(cls);
	return list;
}

static void
pyhostGetForeignPaths(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid)
{
	PyhostRelInfo *info = baserel->fdw_private;
	TupleDesc	tupdesc = info->tupdesc;
	PyObject   *instance = info->instance;
	Cost		startup_cost = 20.0;
	/* multicorn2's cost: the wrapper's _startup_cost to start, rows * width in all */
	double		per_row = Max(info->width, 1);
	List	   *sortkeys;
	PyObject   *sc = PyObject_GetAttrString(instance, "_startup_cost");

	if (sc != NULL && PyNumber_Check(sc))
		startup_cost = PyFloat_AsDouble(sc);
	Py_XDECREF(sc);
	PyErr_Clear();

	Cost		total_cost = Max(startup_cost, baserel->rows * per_row);

	/*
	 * The wrapper's own cost of an unparameterized scan matters only where
	 * a parameterized path (a join) may replace it; alone in its query the
	 * scan is the only path, and an inflated cost would only turn on JIT.
	 */
	if (info->total_cost >= 0 && bms_membership(root->all_baserels) != BMS_SINGLETON)
		total_cost = info->total_cost;
	add_path(baserel, (Path *)
			 create_foreignscan_path(root, baserel, NULL, baserel->rows, startup_cost,
									 total_cost, NIL, NULL, NULL, NIL));

	add_parameterized_paths(root, baserel, instance, tupdesc, startup_cost, per_row);

	/* A sorted path when the wrapper can enforce the whole ORDER BY. */
	sortkeys = query_sortkeys(root, baserel);
	if (sortkeys != NIL)
	{
		PyObject   *py_keys = sortkeys_to_python(sortkeys, tupdesc);
		PyObject   *res;
		Py_ssize_t	n;

		pyhost_enter();
		res = PyObject_CallMethod(instance, "can_sort", "O", py_keys);
		pyhost_leave();
		Py_DECREF(py_keys);
		pyhost_check(res, "can_sort");
		/* the leading keys the wrapper took, in the query's order */
		n = 0;
		if (PySequence_Check(res))
		{
			Py_ssize_t	len = PySequence_Size(res);

			while (n < len && n < list_length(sortkeys))
			{
				PyObject   *key = PySequence_GetItem(res, n);
				PyObject   *attnum = key ? PyObject_GetAttrString(key, "attnum") : NULL;
				long		a = attnum ? PyLong_AsLong(attnum) : -1;

				Py_XDECREF(attnum);
				Py_XDECREF(key);
				if (a != intVal(linitial((List *) list_nth(sortkeys, n))))
					break;
				n++;
			}
		}
		Py_DECREF(res);
		PyErr_Clear();
		/* all of the ORDER BY, or (as multicorn2) a leading part of it */
		if (n > 0 && n <= list_length(sortkeys))
			add_path(baserel, (Path *)
					 create_foreignscan_path(root, baserel, NULL, baserel->rows,
											 startup_cost,
											 Max(startup_cost, baserel->rows * per_row),
											 list_truncate(list_copy(root->query_pathkeys), n),
											 NULL, NULL, list_truncate(list_copy(sortkeys), n)));
	}
}

/*
 * LIMIT can go to the wrapper only when the wrapper's rows are the query's
 * rows: one relation, no clauses left for PostgreSQL to filter, no
 * grouping, aggregation, DISTINCT, window functions, set-returning
 * functions, set operations or OFFSET, and any ORDER BY enforced by this path.
 */
static int
pushable_limit(PlannerInfo *root, RelOptInfo *baserel, ForeignPath *best_path)
{
	Query	   *parse = root->parse;
	Node	   *count = parse->limitCount;
	int64		limit;
	PyObject   *res;
	int			ok;

	if (count == NULL || !IsA(count, Const) || ((Const *) count)->constisnull ||
		parse->limitOffset != NULL || parse->limitOption != LIMIT_OPTION_COUNT)
		return -1;
	if (bms_membership(root->all_baserels) != BMS_SINGLETON ||
		baserel->reloptkind != RELOPT_BASEREL || baserel->baserestrictinfo != NIL ||
		best_path->path.param_info != NULL)
		return -1;
	if (parse->groupClause || parse->groupingSets || parse->hasAggs ||
		parse->hasWindowFuncs || parse->distinctClause || parse->hasTargetSRFs ||
		parse->setOperations || parse->havingQual || parse->rowMarks)
		return -1;
	if (root->query_pathkeys != NIL &&
		!pathkeys_contained_in(root->query_pathkeys, best_path->path.pathkeys))
		return -1;
	limit = DatumGetInt64(((Const *) count)->constvalue);
	if (limit < 0 || limit > PG_INT32_MAX)
		return -1;

	pyhost_enter();
	res = PyObject_CallMethod(((PyhostRelInfo *) baserel->fdw_private)->instance, "can_limit",
							  "LO",
							  (long long) limit, Py_None);
	pyhost_leave();
	pyhost_check(res, "can_limit");
	ok = PyObject_IsTrue(res);
	Py_DECREF(res);
	return ok == 1 ? (int) limit : -1;
}

static ForeignScan *
pyhostGetForeignPlan(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid,
					 ForeignPath *best_path, List *tlist, List *scan_clauses,
					 Plan *outer_plan)
{
	PyhostRelInfo *info = baserel->fdw_private;
	List	   *quals = pyhost_extract_quals(root, baserel, scan_clauses);
	List	   *fdw_exprs = NIL;
	List	   *private_quals = NIL;
	List	   *columns = NIL;
	List	   *qual_texts = NIL;
	List	   *context;
	Bitmapset  *attrs_used;
	TupleDesc	tupdesc;
	ListCell   *lc;

	if (IS_UPPER_REL(baserel))
		return pyhost_upper_plan(root, baserel, best_path, tlist, outer_plan);
	attrs_used = bms_copy(info->attrs_used);
	tupdesc = info->tupdesc;

	/* Parameterized paths move join clauses here; their columns are needed too. */
	foreach(lc, scan_clauses)
		pull_varattnos((Node *) lfirst_node(RestrictInfo, lc)->clause, baserel->relid,
					   &attrs_used);

	context = deparse_context_for(get_rel_name(foreigntableid), foreigntableid);
	foreach(lc, quals)
	{
		QualDesc   *q = lfirst(lc);
		const char *attname = NameStr(TupleDescAttr(tupdesc, q->attnum - 1)->attname);
		char	   *text;

		private_quals = lappend(private_quals, pyhost_qual_to_private(q, &fdw_exprs));
		if (q->valkind == QUAL_VALUE_IS_NULL)
			text = psprintf("%s IS NULL", quote_identifier(attname));
		else if (q->valkind == QUAL_VALUE_IS_NOT_NULL)
			text = psprintf("%s IS NOT NULL", quote_identifier(attname));
		else
		{
			/* Vars of outer relations cannot be deparsed here: show them as params. */
			const char *value = bms_is_empty(pull_varnos(root, (Node *) q->expr)) ?
				deparse_expression((Node *) q->expr, context, false, false) : "(outer value)";

			text = psprintf("%s %s %s%s%s", quote_identifier(attname), q->opname,
							q->listkind == QUAL_LIST_ANY ? "ANY(" :
							q->listkind == QUAL_LIST_ALL ? "ALL(" : "",
							value, q->listkind == QUAL_LIST_NONE ? "" : ")");
		}
		qual_texts = lappend(qual_texts, makeString(text));
	}

	columns = used_attnums(attrs_used, tupdesc);

	scan_clauses = extract_actual_clauses(scan_clauses, false);

	return make_foreignscan(tlist, scan_clauses, baserel->relid, fdw_exprs,
							list_make5(private_quals, columns, best_path->fdw_private,
									   makeInteger(pushable_limit(root, baserel, best_path)),
									   qual_texts),
							NIL, NIL, outer_plan);
}

/* ---------------------------------------------------------------------
 * Execution
 * ---------------------------------------------------------------------
 */

static void
scan_release(void *arg)
{
	PyhostScanState *st = arg;

	if (!Py_IsInitialized())
		return;
	Py_CLEAR(st->iterator);
	Py_CLEAR(st->result);
	Py_CLEAR(st->py_columns);
	Py_CLEAR(st->py_sortkeys);
	Py_CLEAR(st->instance);
	if (st->keys)
	{
		for (int i = 0; i < st->natts; i++)
			Py_CLEAR(st->keys[i]);
	}
}

static void
pyhostBeginForeignScan(ForeignScanState *node, int eflags)
{
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	Relation	rel = node->ss.ss_currentRelation;
	TupleDesc	tupdesc = rel ? RelationGetDescr(rel) : NULL;
	PyhostScanState *st;
	List	   *private = fsplan->fdw_private;
	MemoryContextCallback *cb;
	ListCell   *lc;

	if (fsplan->scan.scanrelid == 0)
	{
		pyhost_upper_begin(node, eflags);
		return;
	}
	st = palloc0(sizeof(PyhostScanState));
	node->fdw_state = st;
	if (eflags & EXEC_FLAG_EXPLAIN_ONLY)
		return;

	st->scan_cxt = AllocSetContextCreate(CurrentMemoryContext, "otelspans scan",
										 ALLOCSET_DEFAULT_SIZES);
	cb = MemoryContextAlloc(CurrentMemoryContext, sizeof(MemoryContextCallback));
	cb->func = scan_release;
	cb->arg = st;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, cb);

	st->instance = pyhost_get_instance(RelationGetRelid(rel), &st->column_names);
	Py_INCREF(st->instance);	/* survives a rebuild of the cache entry */
	pyhost_xact_use(RelationGetRelid(rel), st->instance);
	foreach(lc, (List *) list_nth(private, FdwScanPrivateQuals))
		st->quals = lappend(st->quals, pyhost_qual_from_private(lfirst(lc), fsplan->fdw_exprs));
	st->qual_exprs = ExecInitExprList(fsplan->fdw_exprs, (PlanState *) node);
	st->limit = intVal(list_nth(private, FdwScanPrivateLimit));

	st->natts = tupdesc->natts;
	st->needed = palloc0(sizeof(bool) * st->natts);
	st->needed_attnos = palloc0(sizeof(int) * st->natts);
	st->keys = palloc0(sizeof(PyObject *) * st->natts);
	st->convs = palloc0(sizeof(PyhostColumnConv) * st->natts);
	st->py_columns = PyList_New(0);
	foreach(lc, (List *) list_nth(private, FdwScanPrivateColumns))
	{
		int			i = intVal(lfirst(lc)) - 1;
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);

		st->needed[i] = true;
		st->needed_attnos[st->nneeded++] = i;
		st->keys[i] = PyUnicode_FromString(NameStr(att->attname));
		PyList_Append(st->py_columns, st->keys[i]);
		pyhost_init_column_conv(&st->convs[i], att);
	}
	st->py_sortkeys = sortkeys_to_python(list_nth(private, FdwScanPrivateSortKeys), tupdesc);
}

/* Evaluate the quals' values now (parameters are known) and call execute(). */
static void
start_scan(ForeignScanState *node)
{
	PyhostScanState *st = node->fdw_state;
	ExprContext *econtext = node->ss.ps.ps_ExprContext;
	TupleDesc	tupdesc = RelationGetDescr(node->ss.ss_currentRelation);
	int			nexprs = list_length(st->qual_exprs);
	int			nquals = list_length(st->quals);
	Datum	   *expr_values = palloc0(sizeof(Datum) * (nexprs + 1));
	bool	   *expr_nulls = palloc0(sizeof(bool) * (nexprs + 1));
	Datum	   *values = palloc0(sizeof(Datum) * (nquals + 1));
	bool	   *nulls = palloc0(sizeof(bool) * (nquals + 1));
	PyObject   *quals;
	PyObject   *args;
	PyObject   *kwargs;
	PyObject   *method;
	PyObject   *first;
	ListCell   *lc;
	int			k = 0;
	MemoryContext old;

	old = MemoryContextSwitchTo(econtext->ecxt_per_tuple_memory);
	foreach(lc, st->qual_exprs)
	{
		expr_values[k] = ExecEvalExpr((ExprState *) lfirst(lc), econtext, &expr_nulls[k]);
		k++;
	}
	k = 0;
	foreach(lc, st->quals)
	{
		QualDesc   *q = lfirst(lc);

		if (q->valkind == QUAL_VALUE_EXPR)
		{
			int			idx = q->exprindex;

			values[k] = expr_values[idx];
			nulls[k] = expr_nulls[idx];
		}
		k++;
	}
	quals = pyhost_quals_to_python(st->quals, tupdesc, values, nulls, NULL);
	MemoryContextSwitchTo(old);

	args = Py_BuildValue("(NO)", quals, st->py_columns);
	kwargs = PyDict_New();
	if (st->py_sortkeys)
		PyDict_SetItemString(kwargs, "sortkeys", st->py_sortkeys);
	if (st->limit >= 0)
	{
		PyObject   *limit = PyLong_FromLong(st->limit);

		PyDict_SetItemString(kwargs, "limit", limit);
		Py_DECREF(limit);
	}
	method = pyhost_check(PyObject_GetAttrString(st->instance, "execute"), "execute");
	pyhost_enter();
	st->result = PyObject_Call(method, args, kwargs);
	pyhost_leave();
	Py_DECREF(method);
	Py_DECREF(args);
	Py_DECREF(kwargs);
	pyhost_check(st->result, "execute");
	st->started = true;

	if (st->result == Py_None)
		return;
	if (arrow_has_stream(st->result))
	{
		st->arrow = arrow_scan_begin_stream(st->result, tupdesc, st->needed, st->scan_cxt);
		return;
	}
	st->iterator = pyhost_check(PyObject_GetIter(st->result), "iterating over execute()'s result");
	pyhost_enter();
	first = PyIter_Next(st->iterator);
	pyhost_leave();
	if (first == NULL)
	{
		if (PyErr_Occurred())
			pyhost_report_error("execute");
		Py_CLEAR(st->iterator);
		return;
	}
	if (arrow_has_array(first))
	{
		st->arrow = arrow_scan_begin_batches(first, st->iterator, tupdesc, st->needed,
											 st->scan_cxt);
		Py_DECREF(first);
		Py_CLEAR(st->iterator);
		return;
	}
	/* Row path: keep the first row for the first Iterate. */
	Py_DECREF(st->result);
	st->result = first;
}

static void
row_to_slot(PyhostScanState *st, PyObject *row, TupleTableSlot *slot)
{
	Datum	   *values = slot->tts_values;
	bool	   *isnull = slot->tts_isnull;
	bool		is_mapping = PyDict_Check(row) || (!PySequence_Check(row) && PyMapping_Check(row));
	PyObject   *seq = NULL;
	PyObject   *volatile owned = NULL;	/* a value a non-dict mapping returned */

	memset(isnull, true, sizeof(bool) * st->natts);
	if (!is_mapping)
	{
		seq = PySequence_Fast(row, "not a sequence");
		if (seq == NULL)
		{
			PyErr_Clear();
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
					 errmsg("a row must be a mapping or a sequence, not %s", Py_TYPE(row)->tp_name),
					 errhint("Yield dicts keyed by column name, tuples in table column order, or return Arrow data.")));
		}
		if (PySequence_Fast_GET_SIZE(seq) < PyList_GET_SIZE(st->column_names))
		{
			Py_ssize_t	have = PySequence_Fast_GET_SIZE(seq);

			Py_DECREF(seq);
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
					 errmsg("a row has %zd values but the foreign table has %zd columns",
							have, PyList_GET_SIZE(st->column_names)),
					 errhint("Return rows as mappings of column names, or sequences with a value for every column in table order.")));
		}
	}
	PG_TRY();
	{
		int			seqpos = 0;

		for (int i = 0, n = 0; i < st->natts; i++)
		{
			PyObject   *value;

			if (TupleDescAttr(slot->tts_tupleDescriptor, i)->attisdropped)
				continue;
			seqpos = n++;
			if (!st->needed[i])
				continue;
			if (seq)
				value = PySequence_Fast_GET_ITEM(seq, seqpos);
			else
			{
				value = PyDict_Check(row) ? PyDict_GetItemWithError(row, st->keys[i])
					: PyObject_GetItem(row, st->keys[i]);
				if (value == NULL)
				{
					if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_KeyError))
						pyhost_report_error("reading a row");
					PyErr_Clear();
					continue;	/* a missing key is NULL, as in multicorn */
				}
				/*
				 * A new reference: nothing says the mapping keeps the value alive
				 * (it may compute it), so it is released after its conversion.
				 */
				if (!PyDict_Check(row))
					owned = value;
			}
			values[i] = pyhost_python_to_datum(value, &st->convs[i], &isnull[i]);
			if (owned != NULL)
			{
				PyObject   *done = owned;

				owned = NULL;
				Py_DECREF(done);
			}
		}
	}
	PG_FINALLY();
	{
		Py_XDECREF(owned);
		Py_XDECREF(seq);
	}
	PG_END_TRY();
	ExecStoreVirtualTuple(slot);
}

static TupleTableSlot *
pyhostIterateForeignScan(ForeignScanState *node)
{
	PyhostScanState *st = node->fdw_state;
	TupleTableSlot *slot = node->ss.ss_ScanTupleSlot;
	PyObject   *row;

	if (((ForeignScan *) node->ss.ps.plan)->scan.scanrelid == 0)
		return pyhost_upper_iterate(node);
	ExecClearTuple(slot);
	if (!st->started)
		start_scan(node);

	if (st->arrow)
	{
		if (!arrow_scan_next(st->arrow, slot))
			ExecClearTuple(slot);
		return slot;
	}
	if (st->result != NULL && st->iterator != NULL)
	{
		/* the first row, fetched while choosing the path */
		row = st->result;
		st->result = NULL;
	}
	else
		row = NULL;
	/* A None row is skipped, as multicorn2 skips it. */
	while (row == NULL || row == Py_None)
	{
		Py_XDECREF(row);
		if (st->iterator == NULL)
			return slot;
		CHECK_FOR_INTERRUPTS();
		pyhost_enter();
		row = PyIter_Next(st->iterator);
		pyhost_leave();
		if (row == NULL)
		{
			if (PyErr_Occurred())
				pyhost_report_error("execute (iterating)");
			Py_CLEAR(st->iterator);
			return slot;
		}
	}
	PG_TRY();
	{
		row_to_slot(st, row, slot);
	}
	PG_FINALLY();
	{
		Py_DECREF(row);
	}
	PG_END_TRY();
	return slot;
}

static void
reset_scan(PyhostScanState *st)
{
	if (st->arrow)
		arrow_scan_end(st->arrow);
	st->arrow = NULL;
	Py_CLEAR(st->iterator);
	Py_CLEAR(st->result);
	if (st->scan_cxt)
		MemoryContextReset(st->scan_cxt);
	st->started = false;
}

static void
pyhostReScanForeignScan(ForeignScanState *node)
{
	if (((ForeignScan *) node->ss.ps.plan)->scan.scanrelid == 0)
	{
		pyhost_upper_rescan(node);
		return;
	}
	reset_scan(node->fdw_state);
}

static void
pyhostEndForeignScan(ForeignScanState *node)
{
	PyhostScanState *st = node->fdw_state;

	if (((ForeignScan *) node->ss.ps.plan)->scan.scanrelid == 0)
	{
		pyhost_upper_end(node);
		return;
	}
	if (st == NULL || st->scan_cxt == NULL)
		return;
	reset_scan(st);
	if (st->instance)
		pyhost_call_hook(st->instance, "end_scan");
	scan_release(st);
}

/* ---------------------------------------------------------------------
 * EXPLAIN
 * ---------------------------------------------------------------------
 */

static void
pyhostExplainForeignScan(ForeignScanState *node, ExplainState *es)
{
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	List	   *private = fsplan->fdw_private;
	Relation	rel = node->ss.ss_currentRelation;
	TupleDesc	tupdesc;
	PyObject   *instance;
	List	   *quals = NIL;
	List	   *names = NIL;
	PyObject   *py_quals;
	PyObject   *py_columns;
	PyObject   *py_sortkeys;
	PyObject   *lines;
	ListCell   *lc;

	if (fsplan->scan.scanrelid == 0)
	{
		pyhost_upper_explain(node, es);
		return;
	}
	tupdesc = RelationGetDescr(rel);
	instance = pyhost_get_instance(RelationGetRelid(rel), NULL);
	foreach(lc, (List *) list_nth(private, FdwScanPrivateQuals))
		quals = lappend(quals, pyhost_qual_from_private(lfirst(lc), fsplan->fdw_exprs));
	foreach(lc, (List *) list_nth(private, FdwScanPrivateColumns))
	{
		int			i = intVal(lfirst(lc)) - 1;

		names = lappend(names, NameStr(TupleDescAttr(tupdesc, i)->attname));
	}

	py_quals = pyhost_plan_quals_to_python(NULL, quals, tupdesc);
	py_columns = PyList_New(0);
	foreach(lc, names)
	{
		PyObject   *s = PyUnicode_FromString(lfirst(lc));

		PyList_Append(py_columns, s);
		Py_DECREF(s);
	}
	py_sortkeys = sortkeys_to_python(list_nth(private, FdwScanPrivateSortKeys), tupdesc);

	pyhost_enter();
	lines = PyObject_CallMethod(instance, "explain", "OOOO", py_quals, py_columns,
								py_sortkeys ? py_sortkeys : Py_None,
								es->verbose ? Py_True : Py_False);
	pyhost_leave();
	Py_DECREF(py_quals);
	Py_DECREF(py_columns);
	Py_XDECREF(py_sortkeys);
	pyhost_check(lines, "explain");
	{
		PyObject   *iter = pyhost_check(PyObject_GetIter(lines), "explain must return lines");
		PyObject   *line;
		List	   *wrapper_lines = NIL;

		Py_DECREF(lines);
		while ((line = PyIter_Next(iter)) != NULL)
		{
			PyObject   *s = PyObject_Str(line);

			Py_DECREF(line);
			if (s == NULL)
				break;
			wrapper_lines = lappend(wrapper_lines, pstrdup(PyUnicode_AsUTF8(s)));
			Py_DECREF(s);
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			pyhost_report_error("explain");

		/*
		 * One "Wrapper: ..." line each in text; one key holding the list in
		 * JSON, YAML and XML, where a repeated key is not a valid document.
		 */
		if (es->format == EXPLAIN_FORMAT_TEXT)
		{
			foreach(lc, wrapper_lines)
				ExplainPropertyText("Wrapper", lfirst(lc), es);
		}
		else if (wrapper_lines != NIL)
			ExplainPropertyList("Wrapper", wrapper_lines, es);
	}

	if (es->verbose)
	{
		List	   *texts = NIL;

		foreach(lc, (List *) list_nth(private, FdwScanPrivateQualTexts))
			texts = lappend(texts, strVal(lfirst(lc)));
		if (texts != NIL)
			ExplainPropertyList("Pushed Quals", texts, es);
		if (intVal(list_nth(private, FdwScanPrivateLimit)) >= 0)
			ExplainPropertyInteger("Pushed Limit", NULL,
								   intVal(list_nth(private, FdwScanPrivateLimit)), es);
		if (list_nth(private, FdwScanPrivateSortKeys) != NIL)
			ExplainPropertyBool("Pushed Sort", true, es);
	}
}
