/*-------------------------------------------------------------------------
 *
 * upper.c
 *		  Upper-relation pushdown: grouping, aggregates, ORDER BY and LIMIT
 *		  answered by the wrapper on its own columns.
 *
 * A wrapper that implements the optional methods can_pushdown_upper() and
 * execute_upper() (see otelspans_fdw/multicorn_api.py) is offered, as one
 * structured description:
 *
 *	- the grouping of its relation (group keys that are columns or
 *	  date_trunc/date_bin of a timestamptz column) with aggregates
 *	  (count, sum, avg, min, max, count(DISTINCT), bool_or/bool_and,
 *	  percentile_cont/percentile_disc, each with an optional FILTER),
 *	- or the relation's rows themselves (columns only),
 *	- with every condition of the WHERE clause (the wrapper must apply them
 *	  all, exactly: PostgreSQL rechecks nothing below an aggregate),
 *	- and, when the query ends with ORDER BY ... LIMIT, the ordering and the
 *	  limit.
 *
 * Nothing is offered unless every part can be described exactly; anything
 * else (a condition we cannot describe, an aggregate or expression we do
 * not know, a text ordering whose collation is not bytewise) leaves the
 * query to PostgreSQL as before.  HAVING stays with PostgreSQL, as a filter
 * of the foreign scan; a LIMIT is then not pushed.
 *
 * The description is planned as a tree of plain nodes (lists, strings,
 * numbers, Consts) kept in fdw_private, so that cached plans carry it, and
 * turned into Python dicts and lists when the scan starts.  The wrapper
 * answers with Arrow data, one field per output, converted by arrow.c.
 *
 * IDENTIFICATION
 *		  ext/upper.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include <locale.h>

#include "access/table.h"
#include "catalog/pg_aggregate.h"
#include "catalog/pg_am.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_opfamily.h"
#include "catalog/pg_type.h"
#include "commands/defrem.h"
#include "commands/explain.h"
#include "datatype/timestamp.h"
#include "executor/executor.h"
#include "foreign/fdwapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/planmain.h"
#include "optimizer/restrictinfo.h"
#include "optimizer/tlist.h"
#include "parser/parsetree.h"
#include "pgtime.h"
#include "rewrite/rewriteManip.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/pg_locale.h"
#include "utils/rel.h"
#include "utils/ruleutils.h"
#include "utils/selfuncs.h"
#include "utils/timestamp.h"

#define UPPER_MAGIC 0x55505052	/* "UPPR": fdw_private of an upper rel is ours */

/* otelspans.pushdown_upper: off plans every query as before (for comparisons). */
static bool pushdown_upper = true;

/* What one stage of the upper planning knows (output_rel->fdw_private). */
typedef struct UpperRelInfo
{
	int			magic;
	RelOptInfo *baserel;		/* the foreign table's relation */
	PyhostRelInfo *base;
	bool		grouped;
	bool		has_having;
	List	   *tlist;			/* TargetEntry list: what the scan returns */
	List	   *outputs;		/* per tlist entry: its description node */
	List	   *having;			/* HAVING clauses, kept by PostgreSQL */
	List	   *order;			/* order_by description, or NIL */
	List	   *order_texts;	/* for EXPLAIN */
	List	   *texts;			/* per output: deparsed text, for EXPLAIN */
	Cost		cost;			/* of the path at this stage */
} UpperRelInfo;

/* Slots of ForeignScan.fdw_private for an upper scan. */
enum UpperPrivateIndex
{
	UpperPrivateDesc,			/* description tree (see desc_to_python) */
	UpperPrivateQuals,			/* List of qual descriptors */
	UpperPrivateRelid,			/* Integer: foreign table OID */
	UpperPrivateExplain,		/* List of (label String, List of String) */
	UpperPrivateTzDependent		/* Boolean: a group key depends on TimeZone */
};

/* Execution state (node->fdw_state). */
typedef struct UpperScanState
{
	MemoryContext scan_cxt;
	PyObject   *instance;
	TupleDesc	reltupdesc;		/* the foreign table's columns (for Quals) */
	List	   *quals;
	List	   *qual_exprs;
	bool		started;
	PyObject   *result;
	ArrowScan  *arrow;
	bool	   *needed;
} UpperScanState;

/* ---------------------------------------------------------------------
 * The description tree
 *
 * A dict is a List whose first element is the String "{}", followed by key
 * (String) / value pairs; any other List is a Python list; NULL is None;
 * String, Integer, Float, Boolean are str, int, float, bool; a Const is its
 * value (python.c's conversion).
 * ---------------------------------------------------------------------
 */

static List *
dict_new(void)
{
	return list_make1(makeString("{}"));
}

static List *
dict_add(List *dict, const char *key, Node *value)
{
	return lappend(lappend(dict, makeString(pstrdup(key))), value);
}

static Node *
dict_get(List *dict, const char *key)
{
	for (int i = 1; i + 1 < list_length(dict); i += 2)
		if (strcmp(strVal(list_nth(dict, i)), key) == 0)
			return list_nth(dict, i + 1);
	return NULL;
}

static bool
is_dict(Node *node)
{
	return node && IsA(node, List) && list_length((List *) node) >= 1 &&
		linitial((List *) node) != NULL && IsA(linitial((List *) node), String) &&
		strcmp(strVal(linitial((List *) node)), "{}") == 0;
}

static PyObject *
desc_to_python(Node *node)
{
	PyObject   *res;

	if (node == NULL)
		Py_RETURN_NONE;
	switch (nodeTag(node))
	{
		case T_String:
			return pyhost_check(PyUnicode_FromString(strVal(node)), "description");
		case T_Integer:
			return PyLong_FromLong(intVal(node));
		case T_Float:
			return pyhost_check(PyLong_FromString(castNode(Float, node)->fval, NULL, 10),
								"description");
		case T_Boolean:
			return PyBool_FromLong(boolVal(node));
		case T_Const:
			{
				Const	   *c = (Const *) node;

				return pyhost_check(pyhost_datum_to_python(c->constvalue, c->constisnull,
														   c->consttype), "a constant");
			}
		case T_List:
			{
				List	   *l = (List *) node;

				if (is_dict(node))
				{
					res = PyDict_New();
					for (int i = 1; i + 1 < list_length(l); i += 2)
					{
						PyObject   *v = desc_to_python(list_nth(l, i + 1));

						PyDict_SetItemString(res, strVal(list_nth(l, i)), v);
						Py_DECREF(v);
					}
					return res;
				}
				res = PyList_New(0);
				for (int i = 0; i < list_length(l); i++)
				{
					PyObject   *v = desc_to_python(list_nth(l, i));

					PyList_Append(res, v);
					Py_DECREF(v);
				}
				return res;
			}
		default:
			elog(ERROR, "unexpected node in an upper description: %d", (int) nodeTag(node));
	}
	return NULL;				/* keep compiler quiet */
}

/* An int64 as a node (Integer is 32 bits: Float keeps the digits exactly). */
static Node *
make_int64(int64 v)
{
	return (Node *) makeFloat(psprintf(INT64_FORMAT, v));
}

/* ---------------------------------------------------------------------
 * What can be described
 * ---------------------------------------------------------------------
 */

typedef struct DeparseCxt
{
	PlannerInfo *root;
	RelOptInfo *baserel;
	TupleDesc	tupdesc;
	bool		tz_dependent;	/* a group key needs a fixed-offset TimeZone */
	Oid			relid;			/* the foreign table */
} DeparseCxt;

static Node *
strip_relabel(Node *node)
{
	while (node && IsA(node, RelabelType))
		node = (Node *) ((RelabelType *) node)->arg;
	return node;
}

/* A column of our table: its Var, else NULL. */
static Var *
own_column(Node *node, DeparseCxt *cx)
{
	node = strip_relabel(node);
	if (node == NULL || !IsA(node, Var))
		return NULL;
	if (((Var *) node)->varno != cx->baserel->relid || ((Var *) node)->varlevelsup != 0 ||
		((Var *) node)->varattno <= 0)
		return NULL;
	return (Var *) node;
}

static const char *
column_name(Var *var, DeparseCxt *cx)
{
	return NameStr(TupleDescAttr(cx->tupdesc, var->varattno - 1)->attname);
}

/* Types whose values, equality and ordering we can describe and compute. */
static bool
known_type(Oid typid)
{
	switch (typid)
	{
		case BOOLOID:
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case TEXTOID:
		case TIMESTAMPTZOID:
		case UUIDOID:
			return true;
		default:
			return false;
	}
}

static bool
is_integer_type(Oid typid)
{
	return typid == INT2OID || typid == INT4OID || typid == INT8OID;
}

/*
 * Does this collation order text by bytes (so that Arrow's order, which is
 * UTF-8 byte order = code point order, is PostgreSQL's)?
 */
static bool
collation_is_bytewise(Oid collid)
{
	const char *name = NULL;

	if (!OidIsValid(collid))
		return true;
	if (lc_collate_is_c(collid))
		return true;
	if (collid == DEFAULT_COLLATION_OID)
	{
		if (default_locale.provider != COLLPROVIDER_LIBC)
			return false;
		name = setlocale(LC_COLLATE, NULL);
	}
	if (name == NULL)
		return false;
	return pg_strcasecmp(name, "C.UTF-8") == 0 || pg_strcasecmp(name, "C.utf8") == 0;
}

/* Equality on this collation is byte equality. */
static bool
collation_is_deterministic(Oid collid)
{
	return !OidIsValid(collid) || get_collation_isdeterministic(collid);
}

/* Is `opno` the type's default btree operator of this strategy? */
static bool
default_btree_op(Oid opno, Oid typid, int *strategy)
{
	Oid			opclass = GetDefaultOpClass(typid, BTREE_AM_OID);
	Oid			opfamily;

	if (!OidIsValid(opclass))
		return false;
	opfamily = get_opclass_family(opclass);
	*strategy = get_op_opfamily_strategy(opno, opfamily);
	if (*strategy != 0)
		return true;
	/* <> is not a btree member: it is the negator of = */
	if (OidIsValid(get_negator(opno)) &&
		get_op_opfamily_strategy(get_negator(opno), opfamily) == BTEqualStrategyNumber)
	{
		*strategy = -1;
		return true;
	}
	return false;
}

static const char *
strategy_opname(int strategy)
{
	switch (strategy)
	{
		case BTLessStrategyNumber:
			return "<";
		case BTLessEqualStrategyNumber:
			return "<=";
		case BTEqualStrategyNumber:
			return "=";
		case BTGreaterEqualStrategyNumber:
			return ">=";
		case BTGreaterStrategyNumber:
			return ">";
		case -1:
			return "<>";
	}
	return NULL;
}

/*
 * A condition (FILTER clause, argument of bool_or/bool_and) as a list
 * ["and"|"or", [c...]], ["not", c], ["cmp", column, op, value],
 * ["is_null"|"is_not_null", column], ["in"|"not_in", column, [values]],
 * ["const", bool or None]; NULL if it cannot be described.
 */
static Node *
deparse_cond(Node *node, DeparseCxt *cx)
{
	node = strip_relabel(node);
	if (node == NULL)
		return NULL;
	if (IsA(node, BoolExpr))
	{
		BoolExpr   *b = (BoolExpr *) node;
		List	   *args = NIL;
		ListCell   *lc;

		foreach(lc, b->args)
		{
			Node	   *c = deparse_cond(lfirst(lc), cx);

			if (c == NULL)
				return NULL;
			args = lappend(args, c);
		}
		if (b->boolop == NOT_EXPR)
			return (Node *) list_make2(makeString("not"), linitial(args));
		return (Node *) list_make2(makeString(b->boolop == AND_EXPR ? "and" : "or"), args);
	}
	if (IsA(node, Const) && ((Const *) node)->consttype == BOOLOID)
		return (Node *) list_make2(makeString("const"), copyObject(node));
	if (IsA(node, NullTest))
	{
		NullTest   *nt = (NullTest *) node;
		Var		   *var = own_column((Node *) nt->arg, cx);

		if (nt->argisrow || var == NULL || !known_type(var->vartype))
			return NULL;
		return (Node *) list_make2(makeString(nt->nulltesttype == IS_NULL ? "is_null" : "is_not_null"),
								   makeString(pstrdup(column_name(var, cx))));
	}
	if (IsA(node, OpExpr) || IsA(node, ScalarArrayOpExpr))
	{
		Oid			opno;
		Oid			inputcollid;
		List	   *args;
		Var		   *var;
		Node	   *value;
		int			strategy;
		const char *opname;

		if (IsA(node, OpExpr))
		{
			opno = ((OpExpr *) node)->opno;
			inputcollid = ((OpExpr *) node)->inputcollid;
			args = ((OpExpr *) node)->args;
		}
		else
		{
			opno = ((ScalarArrayOpExpr *) node)->opno;
			inputcollid = ((ScalarArrayOpExpr *) node)->inputcollid;
			args = ((ScalarArrayOpExpr *) node)->args;
		}
		if (list_length(args) != 2)
			return NULL;
		var = own_column(linitial(args), cx);
		value = strip_relabel(lsecond(args));
		if (var == NULL && IsA(node, OpExpr))
		{
			/* const op column: commute */
			var = own_column(lsecond(args), cx);
			value = strip_relabel(linitial(args));
			opno = get_commutator(opno);
			if (!OidIsValid(opno))
				return NULL;
		}
		if (var == NULL || value == NULL || !IsA(value, Const) || !known_type(var->vartype))
			return NULL;
		if (!default_btree_op(opno, var->vartype, &strategy))
			return NULL;
		/* both sides of the column's own type (no cross-type comparisons) */
		{
			Oid			left,
						right;

			op_input_types(opno, &left, &right);
			if (left != var->vartype ||
				(right != var->vartype && !(is_integer_type(left) && is_integer_type(right))))
				return NULL;
		}
		if (var->vartype == TEXTOID)
		{
			if (strategy == BTEqualStrategyNumber || strategy == -1)
			{
				if (!collation_is_deterministic(inputcollid))
					return NULL;
			}
			else if (!collation_is_bytewise(inputcollid))
				return NULL;
		}
		opname = strategy_opname(strategy);
		if (IsA(node, OpExpr))
			return (Node *) list_make4(makeString("cmp"), makeString(pstrdup(column_name(var, cx))),
									   makeString(pstrdup(opname)), copyObject(value));
		/* = ANY(array) and <> ALL(array) */
		if (((ScalarArrayOpExpr *) node)->useOr && strategy == BTEqualStrategyNumber)
			return (Node *) list_make3(makeString("in"), makeString(pstrdup(column_name(var, cx))),
									   copyObject(value));
		if (!((ScalarArrayOpExpr *) node)->useOr && strategy == -1)
			return (Node *) list_make3(makeString("not_in"), makeString(pstrdup(column_name(var, cx))),
									   copyObject(value));
		return NULL;
	}
	return NULL;
}

/* Units of date_trunc we compute, and whether they depend on TimeZone. */
static const char *
trunc_unit(const char *unit, bool *tz_dependent)
{
	static const struct
	{
		const char *name;
		const char *canonical;
		bool		tz;
	}			units[] =
	{
		{"microseconds", "microseconds", false},
		{"milliseconds", "milliseconds", false},
		{"second", "second", false},
		{"seconds", "second", false},
		{"minute", "minute", true},
		{"minutes", "minute", true},
		{"hour", "hour", true},
		{"hours", "hour", true},
		{"day", "day", true},
		{"days", "day", true},
		{"week", "week", true},
		{"weeks", "week", true},
		{"month", "month", true},
		{"months", "month", true},
		{"quarter", "quarter", true},
		{"year", "year", true},
		{"years", "year", true},
	};

	for (int i = 0; i < lengthof(units); i++)
		if (pg_strcasecmp(unit, units[i].name) == 0)
		{
			*tz_dependent = units[i].tz;
			return units[i].canonical;
		}
	return NULL;
}

/* Is the session's TimeZone a fixed offset from UTC (and which)? */
static bool
session_fixed_offset(long *gmtoff)
{
	return pg_get_timezone_offset(session_timezone, gmtoff);
}

static bool
is_catalog_function(Oid funcid, const char *name)
{
	char	   *fname = get_func_name(funcid);

	return fname && strcmp(fname, name) == 0 &&
		get_func_namespace(funcid) == PG_CATALOG_NAMESPACE;
}

/*
 * A group key: {"column": c} or {"function": "date_trunc", "unit": u,
 * "column": c} or {"function": "date_bin", "stride_us": n, "origin_us": n,
 * "column": c}; NULL if it cannot be described.
 */
static List *
deparse_group_key(Node *node, DeparseCxt *cx)
{
	Var		   *var = own_column(node, cx);
	List	   *d = dict_new();

	if (var)
	{
		if (!known_type(var->vartype) || !collation_is_deterministic(var->varcollid))
			return NULL;
		return dict_add(d, "column", (Node *) makeString(pstrdup(column_name(var, cx))));
	}
	node = strip_relabel(node);
	if (exprType(node) == BOOLOID)
	{
		/* a condition: GROUP BY parent_span_id IS NULL */
		Node	   *cond = deparse_cond(node, cx);

		if (cond == NULL)
			return NULL;
		return dict_add(d, "condition", cond);
	}
	if (IsA(node, FuncExpr))
	{
		FuncExpr   *f = (FuncExpr *) node;

		if (is_catalog_function(f->funcid, "date_trunc") && list_length(f->args) == 2 &&
			f->funcresulttype == TIMESTAMPTZOID)
		{
			Node	   *u = strip_relabel(linitial(f->args));
			const char *unit;
			bool		tz;
			long		gmtoff;

			var = own_column(lsecond(f->args), cx);
			if (var == NULL || var->vartype != TIMESTAMPTZOID || !IsA(u, Const) ||
				((Const *) u)->constisnull)
				return NULL;
			unit = trunc_unit(TextDatumGetCString(((Const *) u)->constvalue), &tz);
			if (unit == NULL)
				return NULL;
			if (tz)
			{
				/* Local-time units: only where the offset is the same for every instant. */
				if (!session_fixed_offset(&gmtoff))
					return NULL;
				cx->tz_dependent = true;
			}
			d = dict_add(d, "function", (Node *) makeString("date_trunc"));
			d = dict_add(d, "unit", (Node *) makeString(pstrdup(unit)));
			return dict_add(d, "column", (Node *) makeString(pstrdup(column_name(var, cx))));
		}
		if (is_catalog_function(f->funcid, "date_bin") && list_length(f->args) == 3 &&
			f->funcresulttype == TIMESTAMPTZOID)
		{
			Node	   *s = strip_relabel(linitial(f->args));
			Node	   *o = strip_relabel(lthird(f->args));
			Interval   *stride;
			int64		stride_us;

			var = own_column(lsecond(f->args), cx);
			if (var == NULL || var->vartype != TIMESTAMPTZOID || !IsA(s, Const) ||
				((Const *) s)->constisnull || !IsA(o, Const) || ((Const *) o)->constisnull ||
				((Const *) o)->consttype != TIMESTAMPTZOID)
				return NULL;
			stride = DatumGetIntervalP(((Const *) s)->constvalue);
			/* PostgreSQL raises an ERROR for these: leave them to it */
			if (stride->month != 0 ||
				pg_mul_s64_overflow(stride->day, USECS_PER_DAY, &stride_us) ||
				pg_add_s64_overflow(stride_us, stride->time, &stride_us) || stride_us <= 0)
				return NULL;
			if (TIMESTAMP_NOT_FINITE(DatumGetTimestampTz(((Const *) o)->constvalue)))
				return NULL;
			d = dict_add(d, "function", (Node *) makeString("date_bin"));
			d = dict_add(d, "stride_us", make_int64(stride_us));
			/* origin as microseconds since 1970 */
			d = dict_add(d, "origin_us",
						 make_int64(DatumGetTimestampTz(((Const *) o)->constvalue) +
									(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY));
			return dict_add(d, "column", (Node *) makeString(pstrdup(column_name(var, cx))));
		}
	}
	return NULL;
}

/* The argument of an aggregate: a column, or an int -> float8 cast of one. */
static Var *
agg_column_arg(Node *node, DeparseCxt *cx, bool allow_float_cast)
{
	Var		   *var = own_column(node, cx);

	if (var == NULL && allow_float_cast && IsA(strip_relabel(node), FuncExpr))
	{
		FuncExpr   *f = (FuncExpr *) strip_relabel(node);

		if (f->funcresulttype == FLOAT8OID && list_length(f->args) == 1 &&
			is_catalog_function(f->funcid, "float8"))
		{
			var = own_column(linitial(f->args), cx);
			if (var && var->vartype != INT8OID && var->vartype != INT4OID &&
				var->vartype != INT2OID)
				var = NULL;
		}
	}
	if (var == NULL || !known_type(var->vartype))
		return NULL;
	return var;
}

/* A fraction (or array of them) of a percentile: a Const within [0, 1]. */
static Node *
percentile_fraction(Node *node, bool *is_array)
{
	Const	   *c;

	node = strip_relabel(node);
	if (node == NULL || !IsA(node, Const) || ((Const *) node)->constisnull)
		return NULL;
	c = (Const *) node;
	if (c->consttype == FLOAT8OID)
	{
		float8		v = DatumGetFloat8(c->constvalue);

		*is_array = false;
		if (isnan(v) || v < 0 || v > 1)
			return NULL;		/* PostgreSQL's ERROR, not ours */
		return (Node *) c;
	}
	if (c->consttype == FLOAT8ARRAYOID)
	{
		ArrayType  *arr = DatumGetArrayTypeP(c->constvalue);
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		if (ARR_NDIM(arr) > 1)
			return NULL;
		deconstruct_array(arr, FLOAT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &elems, &nulls, &n);
		for (int i = 0; i < n; i++)
		{
			float8		v = nulls[i] ? 0 : DatumGetFloat8(elems[i]);

			if (isnan(v) || v < 0 || v > 1)
				return NULL;
		}
		*is_array = true;
		return (Node *) c;
	}
	return NULL;
}

/*
 * An aggregate: {"function": f, "column": c or None, "argument": cond or
 * None, "distinct": b, "filter": cond or None, "fraction": x or [x...] or
 * None, "type": result type}; NULL if it cannot be described.
 */
static List *
deparse_agg(Aggref *agg, DeparseCxt *cx)
{
	char	   *fname = get_func_name(agg->aggfnoid);
	List	   *d = dict_new();
	Node	   *filter = NULL;
	Var		   *var = NULL;
	Node	   *argument = NULL;
	Node	   *fraction = NULL;
	bool		is_array = false;
	Node	   *arg0 = NULL;

	if (fname == NULL || get_func_namespace(agg->aggfnoid) != PG_CATALOG_NAMESPACE ||
		agg->agglevelsup != 0 || agg->aggsplit != AGGSPLIT_SIMPLE || agg->aggvariadic)
		return NULL;
	if (agg->aggfilter)
	{
		filter = deparse_cond((Node *) agg->aggfilter, cx);
		if (filter == NULL)
			return NULL;
	}
	if (list_length(agg->args) > 1)
		return NULL;
	if (agg->args)
		arg0 = (Node *) linitial_node(TargetEntry, agg->args)->expr;

	if (agg->aggkind == AGGKIND_ORDERED_SET)
	{
		bool		cont = strcmp(fname, "percentile_cont") == 0;

		if (!cont && strcmp(fname, "percentile_disc") != 0)
			return NULL;
		if (list_length(agg->aggdirectargs) != 1 || agg->aggdistinct || arg0 == NULL)
			return NULL;
		fraction = percentile_fraction(linitial(agg->aggdirectargs), &is_array);
		if (fraction == NULL)
			return NULL;
		/* the WITHIN GROUP ordering must be the type's default ascending one */
		{
			Oid			argtype = exprType(arg0);
			Oid			opclass = GetDefaultOpClass(argtype, BTREE_AM_OID);
			SortGroupClause *sgc;

			if (list_length(agg->aggorder) != 1 || !OidIsValid(opclass))
				return NULL;
			sgc = linitial_node(SortGroupClause, agg->aggorder);
			if (sgc->sortop != get_opfamily_member(get_opclass_family(opclass), argtype, argtype,
												   BTLessStrategyNumber) || sgc->nulls_first)
				return NULL;
		}
		var = agg_column_arg(arg0, cx, cont);
		if (var == NULL)
			return NULL;
		if (cont && exprType(arg0) != FLOAT8OID)
			return NULL;
		if (!cont && var->vartype != INT8OID && var->vartype != TIMESTAMPTZOID)
			return NULL;
		if (!cont && is_array && var->vartype != INT8OID)
			return NULL;		/* timestamptz[] through text: not worth it */
	}
	else
	{
		if (agg->aggkind != AGGKIND_NORMAL || agg->aggorder != NIL)
			return NULL;
		if (agg->aggdistinct && (strcmp(fname, "count") != 0 || agg->aggstar))
			return NULL;
		if (strcmp(fname, "count") == 0)
		{
			if (!agg->aggstar)
			{
				var = agg_column_arg(arg0, cx, false);
				if (var == NULL)
					return NULL;
				if (agg->aggdistinct && var->vartype == TEXTOID &&
					!collation_is_deterministic(agg->inputcollid))
					return NULL;
			}
		}
		else if (strcmp(fname, "sum") == 0 || strcmp(fname, "avg") == 0)
		{
			var = agg_column_arg(arg0, cx, false);
			if (var == NULL || exprType(arg0) != INT8OID)
				return NULL;
		}
		else if (strcmp(fname, "min") == 0 || strcmp(fname, "max") == 0)
		{
			var = agg_column_arg(arg0, cx, false);
			if (var == NULL || exprType(arg0) != var->vartype)
				return NULL;
			if (var->vartype != INT8OID && var->vartype != TIMESTAMPTZOID &&
				var->vartype != TEXTOID)
				return NULL;
			if (var->vartype == TEXTOID && !collation_is_bytewise(agg->inputcollid))
				return NULL;
		}
		else if (strcmp(fname, "bool_or") == 0 || strcmp(fname, "bool_and") == 0)
		{
			argument = deparse_cond(arg0, cx);
			if (argument == NULL)
				return NULL;
		}
		else
			return NULL;
	}

	d = dict_add(d, "function", (Node *) makeString(fname));
	d = dict_add(d, "column", var ? (Node *) makeString(pstrdup(column_name(var, cx))) : NULL);
	d = dict_add(d, "argument", argument);
	d = dict_add(d, "distinct", (Node *) makeBoolean(agg->aggdistinct != NIL));
	d = dict_add(d, "filter", filter);
	d = dict_add(d, "fraction", fraction ? copyObject(fraction) : NULL);
	return dict_add(d, "type", (Node *) makeString(format_type_be(agg->aggtype)));
}

/* The text EXPLAIN shows for an expression of the base relation. */
static char *
deparse_text(Node *expr, DeparseCxt *cx)
{
	Node	   *copy = copyObject(expr);
	List	   *context;
	Oid			relid = cx->relid;

	ChangeVarNodes(copy, cx->baserel->relid, 1, 0);
	context = deparse_context_for(get_rel_name(relid), relid);
	return deparse_expression(copy, context, false, false);
}

/* ---------------------------------------------------------------------
 * Planning
 * ---------------------------------------------------------------------
 */

static bool
has_upper_api(PyhostRelInfo *base)
{
	return PyObject_HasAttrString(base->instance, "execute_upper") &&
		PyObject_HasAttrString(base->instance, "can_pushdown_upper");
}

/* Every WHERE condition must reach the wrapper: nothing is rechecked. */
static List *
all_quals(PlannerInfo *root, RelOptInfo *baserel)
{
	List	   *quals = pyhost_extract_quals(root, baserel, baserel->baserestrictinfo);
	ListCell   *lc;

	if (list_length(quals) != list_length(baserel->baserestrictinfo))
		return (List *) -1;
	/*
	 * A value of another type than the column's would be converted by the
	 * wrapper with rules of its own (a date against a timestamptz depends on
	 * TimeZone): only same-type values, integers of any width for integers.
	 */
	foreach(lc, quals)
	{
		QualDesc   *q = lfirst(lc);
		Oid			coltype = TupleDescAttr(((PyhostRelInfo *) baserel->fdw_private)->tupdesc,
											q->attnum - 1)->atttypid;
		Oid			valtype = q->valtype;

		if (q->valkind != QUAL_VALUE_EXPR)
			continue;
		if (q->listkind != QUAL_LIST_NONE)
			valtype = get_element_type(valtype);
		if (valtype != coltype && !(is_integer_type(valtype) && is_integer_type(coltype)))
			return (List *) -1;
	}
	foreach(lc, baserel->baserestrictinfo)
	{
		RestrictInfo *ri = lfirst_node(RestrictInfo, lc);

		if (ri->pseudoconstant)
			return (List *) -1;
	}
	return quals;
}

/* Ask the wrapper whether it takes this description. */
static bool
wrapper_accepts(PyhostRelInfo *base, RelOptInfo *baserel, PlannerInfo *root, List *desc,
				List *quals)
{
	PyObject   *py_desc = desc_to_python((Node *) desc);
	PyObject   *py_quals;
	PyObject   *res;
	int			ok;

	/* Values are not known while planning (parameters, now()): None. */
	py_quals = pyhost_quals_to_python(quals, base->tupdesc, NULL, NULL, NULL);
	PyDict_SetItemString(py_desc, "quals", py_quals);
	Py_DECREF(py_quals);
	pyhost_enter();
	res = PyObject_CallMethod(base->instance, "can_pushdown_upper", "O", py_desc);
	pyhost_leave();
	Py_DECREF(py_desc);
	pyhost_check(res, "can_pushdown_upper");
	ok = PyObject_IsTrue(res);
	Py_DECREF(res);
	return ok == 1;
}

static UpperRelInfo *
new_upper_info(RelOptInfo *baserel)
{
	UpperRelInfo *info = palloc0(sizeof(UpperRelInfo));

	info->magic = UPPER_MAGIC;
	info->baserel = baserel;
	info->base = baserel->fdw_private;
	return info;
}

static UpperRelInfo *
upper_info_of(RelOptInfo *rel)
{
	UpperRelInfo *info = rel->fdw_private;

	if (rel->reloptkind != RELOPT_UPPER_REL || info == NULL || info->magic != UPPER_MAGIC)
		return NULL;
	return info;
}

/* A copy whose lists can grow without changing the original. */
static UpperRelInfo *
copy_upper_info(UpperRelInfo *in)
{
	UpperRelInfo *info = palloc0(sizeof(UpperRelInfo));

	*info = *in;
	info->tlist = list_copy(in->tlist);
	info->outputs = list_copy(in->outputs);
	info->texts = list_copy(in->texts);
	info->order = list_copy(in->order);
	info->order_texts = list_copy(in->order_texts);
	return info;
}

static bool
is_our_baserel(RelOptInfo *rel)
{
	return rel->reloptkind == RELOPT_BASEREL && rel->fdw_private != NULL &&
		rel->fdwroutine && rel->fdwroutine->GetForeignUpperPaths == pyhostGetForeignUpperPaths;
}

/* Add `expr` to the info's tlist with description `desc` (once). */
static void
add_output(UpperRelInfo *info, Expr *expr, Index sortgroupref, const char *prefix,
		   const char *colname, Node *desc, char *text)
{
	TargetEntry *tle;
	int			n = list_length(info->tlist);
	char	   *name;

	if (tlist_member(expr, info->tlist))
		return;
	/* outputs of a grouping are g<n>/a<n>; rows keep their column names */
	name = colname ? pstrdup(colname) : psprintf("%s%d", prefix, n);
	tle = makeTargetEntry(expr, n + 1, name, false);
	tle->ressortgroupref = sortgroupref;
	info->tlist = lappend(info->tlist, tle);
	info->outputs = lappend(info->outputs, dict_add((List *) desc, "output",
													(Node *) makeString(name)));
	info->texts = lappend(info->texts, makeString(text));
}

/* The aggregates of `node` (Vars outside them: false). */
static bool
add_aggregates_of(UpperRelInfo *info, Node *node, DeparseCxt *cx)
{
	List	   *items = pull_var_clause(node, PVC_INCLUDE_AGGREGATES);
	ListCell   *lc;

	foreach(lc, items)
	{
		Node	   *item = lfirst(lc);
		List	   *d;

		if (IsA(item, Var))
		{
			/* a group column used outside an aggregate (HAVING service_name ...) */
			if (tlist_member((Expr *) item, info->tlist))
				continue;
			return false;
		}
		if (!IsA(item, Aggref))
			return false;
		if (tlist_member((Expr *) item, info->tlist))
			continue;
		d = deparse_agg((Aggref *) item, cx);
		if (d == NULL)
			return false;
		add_output(info, (Expr *) item, 0, "a", NULL, (Node *) d, deparse_text(item, cx));
	}
	return true;
}

static List *
describe_grouping(UpperRelInfo *info)
{
	List	   *desc = dict_new();
	List	   *keys = NIL;
	List	   *aggs = NIL;
	ListCell   *lc;

	foreach(lc, info->outputs)
	{
		List	   *d = lfirst(lc);

		if (dict_get(d, "function") && dict_get(d, "type"))
			aggs = lappend(aggs, d);
		else
			keys = lappend(keys, d);
	}
	/* an empty List is NIL, which reads as None: say it is a grouping */
	desc = dict_add(desc, "grouped", (Node *) makeBoolean(true));
	desc = dict_add(desc, "group_by", (Node *) keys);
	desc = dict_add(desc, "aggregates", (Node *) aggs);
	return desc;
}

static void
add_grouping_path(PlannerInfo *root, RelOptInfo *input_rel, RelOptInfo *grouped_rel,
				  GroupPathExtraData *extra)
{
	Query	   *parse = root->parse;
	PathTarget *target = grouped_rel->reltarget;
	UpperRelInfo *info = new_upper_info(input_rel);
	DeparseCxt	cx = {root, input_rel, info->base->tupdesc, false, info->base->foreigntableid};
	List	   *quals;
	List	   *desc;
	List	   *group_exprs = NIL;
	double		rows;
	Cost		cost;
	ListCell   *lc;
	int			i = 0;

	if (parse->groupingSets || extra->patype != PARTITIONWISE_AGGREGATE_NONE ||
		!has_upper_api(info->base))
		return;
	quals = all_quals(root, input_rel);
	if (quals == (List *) -1)
		return;

	foreach(lc, target->exprs)
	{
		Expr	   *expr = lfirst(lc);
		Index		sgref = get_pathtarget_sortgroupref(target, i);

		i++;
		if (sgref && get_sortgroupref_clause_noerr(sgref, parse->groupClause))
		{
			List	   *d = deparse_group_key((Node *) expr, &cx);

			if (d == NULL)
				return;
			add_output(info, expr, sgref, "g", NULL, (Node *) d, deparse_text((Node *) expr, &cx));
			group_exprs = lappend(group_exprs, expr);
		}
	}
	foreach(lc, target->exprs)
	{
		Expr	   *expr = lfirst(lc);

		if (tlist_member(expr, info->tlist))
			continue;
		if (!add_aggregates_of(info, (Node *) expr, &cx))
			return;
	}
	if (extra->havingQual)
	{
		if (!add_aggregates_of(info, extra->havingQual, &cx))
			return;
		info->having = (List *) extra->havingQual;
		info->has_having = info->having != NIL;
	}
	info->grouped = true;

	desc = describe_grouping(info);
	if (!wrapper_accepts(info->base, input_rel, root, desc, quals))
		return;

	rows = group_exprs ? estimate_num_groups(root, group_exprs, input_rel->rows, NULL, NULL) : 1;
	/* Arrow columns instead of tuples: a fraction of what a scan plus Agg costs. */
	cost = 100.0 + input_rel->rows * cpu_operator_cost * 0.5 + rows * cpu_tuple_cost;
	info->cost = cost;
	grouped_rel->fdw_private = info;
	add_path(grouped_rel, (Path *) create_foreign_upper_path(root, grouped_rel, target,
															 rows, cost, cost, NIL, NULL,
															 NIL));
	(void) cx.tz_dependent;
}

/*
 * ORDER BY: record the ordering as outputs of the input (an output of the
 * grouping, or a column of the table); the path comes with the LIMIT.
 */
static void
record_ordering(PlannerInfo *root, RelOptInfo *input_rel, RelOptInfo *ordered_rel)
{
	UpperRelInfo *in = upper_info_of(input_rel);
	UpperRelInfo *info;
	DeparseCxt	cx;
	ListCell   *lc;

	if (in == NULL && !is_our_baserel(input_rel))
		return;
	if (in && (!in->grouped || in->has_having || in->order))
		return;
	if (in == NULL)
	{
		info = new_upper_info(input_rel);
		if (!has_upper_api(info->base))
			return;
	}
	else
		info = copy_upper_info(in);
	cx = (DeparseCxt)
	{
		root, info->baserel, info->base->tupdesc, false, info->base->foreigntableid
	};
	info->order = NIL;
	info->order_texts = NIL;
	foreach(lc, root->sort_pathkeys)
	{
		PathKey    *pk = lfirst(lc);
		EquivalenceClass *ec = pk->pk_eclass;
		TargetEntry *found = NULL;
		Oid			type = InvalidOid;
		ListCell   *lc2;
		List	   *d;
		int			strategy;

		if (ec->ec_has_volatile)
			return;
		foreach(lc2, ec->ec_members)
		{
			EquivalenceMember *em = lfirst(lc2);
			Expr	   *expr = em->em_expr;

			if (in)
				found = tlist_member(expr, info->tlist);
			else if (own_column((Node *) expr, &cx))
			{
				Var		   *var = own_column((Node *) expr, &cx);

				if (known_type(var->vartype))
				{
					add_output(info, (Expr *) var, 0, NULL, column_name(var, &cx), (Node *) dict_new(),
							   deparse_text((Node *) var, &cx));
					found = tlist_member((Expr *) var, info->tlist);
				}
			}
			if (found)
			{
				type = exprType((Node *) found->expr);
				break;
			}
		}
		if (found == NULL)
			return;
		/* The type's default order, and a collation that sorts text by bytes. */
		if (pk->pk_opfamily != get_opclass_family(GetDefaultOpClass(type, BTREE_AM_OID)))
			return;
		if (type == NUMERICOID || type == FLOAT8OID || type == INT8OID || type == INT4OID ||
			type == INT2OID || type == TIMESTAMPTZOID || type == UUIDOID || type == BOOLOID)
			 /* ok */ ;
		else if (type == TEXTOID)
		{
			if (!collation_is_bytewise(ec->ec_collation))
				return;
		}
		else
			return;
		strategy = pk->pk_strategy;
		d = dict_new();
		d = dict_add(d, "output", (Node *) makeString(pstrdup(found->resname)));
		d = dict_add(d, "descending", (Node *) makeBoolean(strategy == BTGreaterStrategyNumber));
		d = dict_add(d, "nulls_first", (Node *) makeBoolean(pk->pk_nulls_first));
		info->order = lappend(info->order, d);
		info->order_texts = lappend(info->order_texts,
									makeString(psprintf("%s%s%s",
														strVal(list_nth(info->texts, found->resno - 1)),
														strategy == BTGreaterStrategyNumber ? " DESC" : "",
														pk->pk_nulls_first != (strategy == BTGreaterStrategyNumber) ?
														(pk->pk_nulls_first ? " NULLS FIRST" : " NULLS LAST") : "")));
	}
	if (info->order == NIL)
		return;
	ordered_rel->fdw_private = info;
}

/* LIMIT (after any ORDER BY): the whole query's rows come from the wrapper. */
static void
add_final_path(PlannerInfo *root, RelOptInfo *input_rel, RelOptInfo *final_rel,
			   FinalPathExtraData *extra)
{
	Query	   *parse = root->parse;
	UpperRelInfo *in = upper_info_of(input_rel);
	UpperRelInfo *info;
	PathTarget *target = root->upper_targets[UPPERREL_FINAL];
	Node	   *count = parse->limitCount;
	Node	   *offset = parse->limitOffset;
	int64		limit;
	int64		skip = 0;
	List	   *quals;
	List	   *desc;
	DeparseCxt	cx;
	Cost		cost;
	ListCell   *lc;

	if (!extra->limit_needed || parse->rowMarks || parse->hasTargetSRFs ||
		parse->limitOption != LIMIT_OPTION_COUNT)
		return;
	if (count == NULL || !IsA(count, Const) || ((Const *) count)->constisnull)
		return;
	limit = DatumGetInt64(((Const *) count)->constvalue);
	if (offset)
	{
		if (!IsA(offset, Const) || ((Const *) offset)->constisnull)
			return;
		skip = DatumGetInt64(((Const *) offset)->constvalue);
	}
	if (limit < 0 || skip < 0)
		return;
	if (in == NULL && !is_our_baserel(input_rel))
		return;
	if (in && in->has_having)
		return;
	if (in == NULL)
	{
		info = new_upper_info(input_rel);
		if (!has_upper_api(info->base))
			return;
	}
	else
		info = copy_upper_info(in);
	cx = (DeparseCxt)
	{
		root, info->baserel, info->base->tupdesc, false, info->base->foreigntableid
	};
	if (!info->grouped)
	{
		/* The rows themselves: the columns the query uses. */
		List	   *vars = pull_var_clause((Node *) target->exprs, PVC_RECURSE_PLACEHOLDERS);

		foreach(lc, vars)
		{
			Var		   *var = own_column(lfirst(lc), &cx);

			if (var == NULL)
				return;
			add_output(info, (Expr *) var, 0, NULL, column_name(var, &cx), (Node *) dict_new(),
					   deparse_text((Node *) var, &cx));
		}
		if (info->tlist == NIL)
			return;
	}
	quals = all_quals(root, info->baserel);
	if (quals == (List *) -1)
		return;

	desc = info->grouped ? describe_grouping(info) : dict_new();
	if (!info->grouped)
	{
		List	   *cols = NIL;

		foreach(lc, info->tlist)
			cols = lappend(cols, makeString(pstrdup(column_name((Var *) lfirst_node(TargetEntry, lc)->expr, &cx))));
		desc = dict_add(desc, "columns", (Node *) cols);
	}
	desc = dict_add(desc, "order_by", (Node *) info->order);
	desc = dict_add(desc, "limit", make_int64(limit));
	desc = dict_add(desc, "offset", make_int64(skip));
	if (!wrapper_accepts(info->base, info->baserel, root, desc, quals))
		return;

	/* Below what PostgreSQL's Limit over our (or its) paths costs. */
	cost = info->grouped ? info->cost * 0.99 :
		100.0 + info->baserel->rows * cpu_operator_cost * 0.5;
	info->cost = cost;
	final_rel->fdw_private = info;
	add_path(final_rel, (Path *) create_foreign_upper_path(root, final_rel, target,
														   Min(limit, info->grouped ? final_rel->rows : info->baserel->rows) + 1,
														   cost, cost, root->sort_pathkeys,
														   NULL, list_make2(make_int64(limit), make_int64(skip))));
}

void
pyhost_upper_init(void)
{
	DefineCustomBoolVariable("otelspans.pushdown_upper",
							 "Offers grouping, aggregates and ORDER BY ... LIMIT to wrappers that answer them.",
							 "Off: PostgreSQL computes them over the scan, as under multicorn2.",
							 &pushdown_upper, true, PGC_USERSET, 0, NULL, NULL, NULL);
}

void
pyhostGetForeignUpperPaths(PlannerInfo *root, UpperRelationKind stage, RelOptInfo *input_rel,
						   RelOptInfo *output_rel, void *extra)
{
	if (output_rel->fdw_private != NULL || !pushdown_upper)
		return;
	switch (stage)
	{
		case UPPERREL_GROUP_AGG:
			if (is_our_baserel(input_rel))
				add_grouping_path(root, input_rel, output_rel, extra);
			break;
		case UPPERREL_ORDERED:
			record_ordering(root, input_rel, output_rel);
			break;
		case UPPERREL_FINAL:
			add_final_path(root, input_rel, output_rel, extra);
			break;
		default:
			break;
	}
}

ForeignScan *
pyhost_upper_plan(PlannerInfo *root, RelOptInfo *foreignrel, ForeignPath *best_path,
				  List *tlist, Plan *outer_plan)
{
	UpperRelInfo *info = upper_info_of(foreignrel);
	RelOptInfo *baserel = info->baserel;
	List	   *quals = pyhost_extract_quals(root, baserel, baserel->baserestrictinfo);
	List	   *fdw_exprs = NIL;
	List	   *private_quals = NIL;
	List	   *qual_texts = NIL;
	List	   *desc;
	List	   *explain = NIL;
	List	   *keys = NIL;
	List	   *aggs = NIL;
	List	   *local = NIL;
	bool		is_final = best_path->fdw_private != NIL;
	DeparseCxt	cx = {root, baserel, info->base->tupdesc, false, info->base->foreigntableid};
	ListCell   *lc;

	foreach(lc, quals)
		private_quals = lappend(private_quals, pyhost_qual_to_private(lfirst(lc), &fdw_exprs));
	foreach(lc, baserel->baserestrictinfo)
		qual_texts = lappend(qual_texts,
							 makeString(deparse_text((Node *) lfirst_node(RestrictInfo, lc)->clause, &cx)));

	desc = info->grouped ? describe_grouping(info) : dict_new();
	foreach(lc, info->outputs)
	{
		List	   *d = lfirst(lc);
		int			i = foreach_current_index(lc);

		if (dict_get(d, "type"))
			aggs = lappend(aggs, list_nth(info->texts, i));
		else if (info->grouped)
		{
			keys = lappend(keys, list_nth(info->texts, i));
			if (dict_get(d, "function") && strcmp(strVal(dict_get(d, "function")), "date_trunc") == 0)
			{
				bool		tz = false;

				(void) trunc_unit(strVal(dict_get(d, "unit")), &tz);
				cx.tz_dependent |= tz;
			}
		}
	}
	if (!info->grouped)
	{
		List	   *cols = NIL;

		foreach(lc, info->tlist)
			cols = lappend(cols, makeString(pstrdup(column_name((Var *) lfirst_node(TargetEntry, lc)->expr, &cx))));
		desc = dict_add(desc, "columns", (Node *) cols);
		explain = lappend(explain, list_make2(makeString("Pushed Columns"), info->texts));
	}
	else
	{
		if (keys)
			explain = lappend(explain, list_make2(makeString("Pushed Grouping"), keys));
		if (aggs)
			explain = lappend(explain, list_make2(makeString("Pushed Aggregates"), aggs));
	}
	if (is_final)
	{
		desc = dict_add(desc, "order_by", (Node *) info->order);
		desc = dict_add(desc, "limit", linitial(best_path->fdw_private));
		desc = dict_add(desc, "offset", lsecond(best_path->fdw_private));
		if (info->order_texts)
			explain = lappend(explain, list_make2(makeString("Pushed Order"), info->order_texts));
		explain = lappend(explain,
						  list_make2(makeString("Pushed Limit"),
									 list_make1(makeString(castNode(Float, linitial(best_path->fdw_private))->fval))));
		if (strcmp(castNode(Float, lsecond(best_path->fdw_private))->fval, "0") != 0)
			explain = lappend(explain,
							  list_make2(makeString("Pushed Offset"),
										 list_make1(makeString(castNode(Float, lsecond(best_path->fdw_private))->fval))));
	}
	else
	{
		desc = dict_add(desc, "order_by", NULL);
		desc = dict_add(desc, "limit", NULL);
		desc = dict_add(desc, "offset", make_int64(0));
		local = info->having;
	}
	if (qual_texts)
		explain = lappend(explain, list_make2(makeString("Pushed Quals"), qual_texts));

	return make_foreignscan(tlist, local, 0, fdw_exprs,
							list_make5(desc, private_quals,
									   makeInteger((int) info->base->foreigntableid),
									   explain, makeBoolean(cx.tz_dependent)),
							info->tlist, NIL, outer_plan);
}

/* ---------------------------------------------------------------------
 * Execution
 * ---------------------------------------------------------------------
 */

static void
upper_release(void *arg)
{
	UpperScanState *st = arg;

	if (!Py_IsInitialized())
		return;
	Py_CLEAR(st->result);
	Py_CLEAR(st->instance);
}

void
pyhost_upper_begin(ForeignScanState *node, int eflags)
{
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	UpperScanState *st = palloc0(sizeof(UpperScanState));
	List	   *private = fsplan->fdw_private;
	Oid			relid = (Oid) intVal(list_nth(private, UpperPrivateRelid));
	MemoryContextCallback *cb;
	Relation	rel;
	ListCell   *lc;
	TupleDesc	tupdesc = node->ss.ss_ScanTupleSlot->tts_tupleDescriptor;

	node->fdw_state = st;
	if (eflags & EXEC_FLAG_EXPLAIN_ONLY)
		return;
	st->scan_cxt = AllocSetContextCreate(CurrentMemoryContext, "otelspans upper scan",
										 ALLOCSET_DEFAULT_SIZES);
	cb = MemoryContextAlloc(CurrentMemoryContext, sizeof(MemoryContextCallback));
	cb->func = upper_release;
	cb->arg = st;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, cb);

	rel = table_open(relid, NoLock);
	st->reltupdesc = CreateTupleDescCopy(RelationGetDescr(rel));
	table_close(rel, NoLock);
	st->instance = pyhost_get_instance(relid, NULL);
	Py_INCREF(st->instance);
	foreach(lc, (List *) list_nth(private, UpperPrivateQuals))
		st->quals = lappend(st->quals, pyhost_qual_from_private(lfirst(lc), fsplan->fdw_exprs));
	st->qual_exprs = ExecInitExprList(fsplan->fdw_exprs, (PlanState *) node);
	st->needed = palloc(sizeof(bool) * (tupdesc->natts + 1));
	for (int i = 0; i < tupdesc->natts; i++)
		st->needed[i] = true;
}

static void
upper_start(ForeignScanState *node)
{
	UpperScanState *st = node->fdw_state;
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	List	   *private = fsplan->fdw_private;
	ExprContext *econtext = node->ss.ps.ps_ExprContext;
	int			nexprs = list_length(st->qual_exprs);
	int			nquals = list_length(st->quals);
	Datum	   *expr_values = palloc0(sizeof(Datum) * (nexprs + 1));
	bool	   *expr_nulls = palloc0(sizeof(bool) * (nexprs + 1));
	Datum	   *values = palloc0(sizeof(Datum) * (nquals + 1));
	bool	   *nulls = palloc0(sizeof(bool) * (nquals + 1));
	PyObject   *desc;
	PyObject   *quals;
	PyObject   *offset;
	long		gmtoff = 0;
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
			values[k] = expr_values[q->exprindex];
			nulls[k] = expr_nulls[q->exprindex];
		}
		k++;
	}
	quals = pyhost_quals_to_python(st->quals, st->reltupdesc, values, nulls, NULL);
	MemoryContextSwitchTo(old);

	desc = desc_to_python(list_nth(private, UpperPrivateDesc));
	PyDict_SetItemString(desc, "quals", quals);
	Py_DECREF(quals);

	/*
	 * `col = NULL` would reach Python as ('=', None), which means IS NULL:
	 * say instead that no row can match (every pushed operator is strict).
	 */
	{
		bool		nothing = false;

		k = 0;
		foreach(lc, st->quals)
		{
			QualDesc   *q = lfirst(lc);

			if (q->valkind == QUAL_VALUE_EXPR && nulls[k])
				nothing = true;
			k++;
		}
		PyDict_SetItemString(desc, "matches_nothing", nothing ? Py_True : Py_False);
	}

	/*
	 * Local-time group keys were planned for a fixed-offset TimeZone; a
	 * cached plan may run after SET TimeZone to a zone with daylight saving.
	 */
	if (session_fixed_offset(&gmtoff))
		offset = PyLong_FromLong(gmtoff);
	else if (boolVal(list_nth(private, UpperPrivateTzDependent)))
	{
		Py_DECREF(desc);
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("this prepared plan groups by local time, and TimeZone \"%s\" has no fixed UTC offset",
						pg_get_timezone_name(session_timezone)),
				 errhint("Prepare the statement again (DISCARD PLANS), or group by date_bin(...), which does not depend on TimeZone.")));
	}
	else
	{
		Py_INCREF(Py_None);
		offset = Py_None;
	}
	PyDict_SetItemString(desc, "utc_offset", offset);
	Py_DECREF(offset);

	pyhost_enter();
	st->result = PyObject_CallMethod(st->instance, "execute_upper", "O", desc);
	pyhost_leave();
	Py_DECREF(desc);
	pyhost_check(st->result, "execute_upper");
	st->started = true;
	if (!arrow_has_stream(st->result))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("execute_upper() must return Arrow data, not %s",
						Py_TYPE(st->result)->tp_name),
				 errhint("Return a pyarrow Table or RecordBatchReader with one field per output.")));
	st->arrow = arrow_scan_begin_stream(st->result, node->ss.ss_ScanTupleSlot->tts_tupleDescriptor,
										st->needed, st->scan_cxt);
}

TupleTableSlot *
pyhost_upper_iterate(ForeignScanState *node)
{
	UpperScanState *st = node->fdw_state;
	TupleTableSlot *slot = node->ss.ss_ScanTupleSlot;

	ExecClearTuple(slot);
	if (!st->started)
		upper_start(node);
	if (!arrow_scan_next(st->arrow, slot))
		ExecClearTuple(slot);
	return slot;
}

static void
upper_reset(UpperScanState *st)
{
	if (st->arrow)
		arrow_scan_end(st->arrow);
	st->arrow = NULL;
	Py_CLEAR(st->result);
	if (st->scan_cxt)
		MemoryContextReset(st->scan_cxt);
	st->started = false;
}

void
pyhost_upper_rescan(ForeignScanState *node)
{
	upper_reset(node->fdw_state);
}

void
pyhost_upper_end(ForeignScanState *node)
{
	UpperScanState *st = node->fdw_state;

	if (st == NULL || st->scan_cxt == NULL)
		return;
	upper_reset(st);
	upper_release(st);
}

void
pyhost_upper_explain(ForeignScanState *node, ExplainState *es)
{
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	List	   *private = fsplan->fdw_private;
	ListCell   *lc;

	foreach(lc, (List *) list_nth(private, UpperPrivateExplain))
	{
		List	   *item = lfirst(lc);
		List	   *texts = NIL;
		ListCell   *lc2;

		foreach(lc2, (List *) lsecond(item))
			texts = lappend(texts, strVal(lfirst(lc2)));
		ExplainPropertyList(strVal(linitial(item)), texts, es);
	}
}
