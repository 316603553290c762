/*-------------------------------------------------------------------------
 *
 * quals.c
 *		  Restriction clauses -> qual descriptors -> Python Qual objects.
 *
 * A clause is offered to the wrapper when one side is a plain column of the
 * foreign table and the other side does not depend on the table and is not
 * volatile: a constant, a parameter ($1 of a prepared statement), a stable
 * expression such as now() - interval '15 minutes', or a column of an outer
 * relation of a parameterized nested loop (replaced by an executor
 * parameter after planning).  Such value expressions go to fdw_exprs and are
 * evaluated when the scan starts, so generic plans keep working.  Anything
 * else is silently left to PostgreSQL, which rechecks every clause anyway.
 *
 * IDENTIFICATION
 *		  ext/quals.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "catalog/pg_type.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/clauses.h"
#include "optimizer/optimizer.h"
#include "utils/lsyscache.h"

/* Slots of a qual descriptor in fdw_private. */
enum QualPrivateIndex
{
	QualPrivateAttnum,			/* Integer: column number */
	QualPrivateOpname,			/* String: operator name */
	QualPrivateListKind,		/* Integer: QualListKind */
	QualPrivateValueKind,		/* Integer: QualValueKind */
	QualPrivateExprIndex,		/* Integer: index in fdw_exprs, or -1 */
	QualPrivateValueType		/* Integer: type OID of the value */
};

static Node *
strip_relabel(Node *node)
{
	while (node && IsA(node, RelabelType))
		node = (Node *) ((RelabelType *) node)->arg;
	return node;
}

static bool
is_own_column(Node *node, RelOptInfo *baserel)
{
	Var		   *var;

	node = strip_relabel(node);
	if (node == NULL || !IsA(node, Var))
		return false;
	var = (Var *) node;
	return var->varno == baserel->relid && var->varlevelsup == 0 && var->varattno > 0;
}

static bool
is_value_side(PlannerInfo *root, Node *node, RelOptInfo *baserel)
{
	return !bms_is_member(baserel->relid, pull_varnos(root, node)) &&
		!contain_volatile_functions(node) &&
		!contain_subplans(node);
}

static QualDesc *
new_qual(Node *col, const char *opname, QualListKind listkind, QualValueKind valkind, Expr *expr)
{
	QualDesc   *q = palloc0(sizeof(QualDesc));

	q->attnum = ((Var *) strip_relabel(col))->varattno;
	q->opname = pstrdup(opname);
	q->listkind = listkind;
	q->valkind = valkind;
	q->expr = expr;
	q->valtype = expr ? exprType((Node *) expr) : InvalidOid;
	return q;
}

static QualDesc *
extract_one(PlannerInfo *root, RelOptInfo *baserel, Expr *clause)
{
	if (IsA(clause, OpExpr))
	{
		OpExpr	   *op = (OpExpr *) clause;
		Node	   *left;
		Node	   *right;
		Oid			opno = op->opno;
		char	   *opname;

		if (list_length(op->args) != 2)
			return NULL;
		left = linitial(op->args);
		right = lsecond(op->args);
		if (!is_own_column(left, baserel))
		{
			Node	   *tmp = left;

			if (!is_own_column(right, baserel))
				return NULL;
			opno = get_commutator(opno);
			if (!OidIsValid(opno))
				return NULL;
			left = right;
			right = tmp;
		}
		if (!is_value_side(root, right, baserel))
			return NULL;
		opname = get_opname(opno);
		if (opname == NULL)
			return NULL;
		return new_qual(left, opname, QUAL_LIST_NONE, QUAL_VALUE_EXPR, (Expr *) right);
	}
	if (IsA(clause, ScalarArrayOpExpr))
	{
		ScalarArrayOpExpr *op = (ScalarArrayOpExpr *) clause;
		Node	   *left = linitial(op->args);
		Node	   *right = lsecond(op->args);
		char	   *opname;

		if (!is_own_column(left, baserel) || !is_value_side(root, right, baserel))
			return NULL;
		opname = get_opname(op->opno);
		if (opname == NULL)
			return NULL;
		return new_qual(left, opname, op->useOr ? QUAL_LIST_ANY : QUAL_LIST_ALL,
						QUAL_VALUE_EXPR, (Expr *) right);
	}
	if (IsA(clause, NullTest))
	{
		NullTest   *nt = (NullTest *) clause;

		if (nt->argisrow || !is_own_column((Node *) nt->arg, baserel))
			return NULL;
		return new_qual((Node *) nt->arg, nt->nulltesttype == IS_NULL ? "=" : "<>",
						QUAL_LIST_NONE,
						nt->nulltesttype == IS_NULL ? QUAL_VALUE_IS_NULL : QUAL_VALUE_IS_NOT_NULL,
						NULL);
	}
	if (IsA(clause, Var) && is_own_column((Node *) clause, baserel) &&
		((Var *) clause)->vartype == BOOLOID)
		return new_qual((Node *) clause, "=", QUAL_LIST_NONE, QUAL_VALUE_EXPR,
						(Expr *) makeBoolConst(true, false));
	/* NOT col is ('<>', True), as multicorn2 gives it */
	if (is_notclause(clause))
	{
		Expr	   *arg = get_notclausearg(clause);

		if (IsA(arg, Var) && is_own_column((Node *) arg, baserel) &&
			((Var *) arg)->vartype == BOOLOID)
			return new_qual((Node *) arg, "<>", QUAL_LIST_NONE, QUAL_VALUE_EXPR,
							(Expr *) makeBoolConst(true, false));
	}
	/* col IS [NOT] TRUE / FALSE / UNKNOWN: ('IS' or 'IS NOT', True / False / None) */
	if (IsA(clause, BooleanTest) && is_own_column((Node *) ((BooleanTest *) clause)->arg, baserel))
	{
		BooleanTest *bt = (BooleanTest *) clause;
		bool		negated = bt->booltesttype == IS_NOT_TRUE ||
			bt->booltesttype == IS_NOT_FALSE || bt->booltesttype == IS_NOT_UNKNOWN;
		bool		unknown = bt->booltesttype == IS_UNKNOWN || bt->booltesttype == IS_NOT_UNKNOWN;
		bool		value = bt->booltesttype == IS_TRUE || bt->booltesttype == IS_NOT_TRUE;

		return new_qual((Node *) bt->arg, negated ? "IS NOT" : "IS", QUAL_LIST_NONE,
						QUAL_VALUE_EXPR, (Expr *) makeBoolConst(value, unknown));
	}
	return NULL;
}

List *
pyhost_extract_quals(PlannerInfo *root, RelOptInfo *baserel, List *clauses)
{
	List	   *res = NIL;
	ListCell   *lc;

	foreach(lc, clauses)
	{
		Node	   *node = lfirst(lc);
		RestrictInfo *rinfo = NULL;
		QualDesc   *q;

		if (IsA(node, RestrictInfo))
		{
			rinfo = (RestrictInfo *) node;
			node = (Node *) rinfo->clause;
		}
		q = extract_one(root, baserel, (Expr *) node);
		if (q != NULL)
		{
			q->rinfo = rinfo;
			res = lappend(res, q);
		}
	}
	return res;
}

List *
pyhost_qual_to_private(QualDesc *qual, List **fdw_exprs)
{
	int			exprindex = -1;

	if (qual->valkind == QUAL_VALUE_EXPR)
	{
		exprindex = list_length(*fdw_exprs);
		*fdw_exprs = lappend(*fdw_exprs, qual->expr);
	}
	return lappend(list_make5(makeInteger(qual->attnum), makeString(qual->opname),
							  makeInteger(qual->listkind), makeInteger(qual->valkind),
							  makeInteger(exprindex)),
				   makeInteger((int) qual->valtype));
}

QualDesc *
pyhost_qual_from_private(List *private, List *fdw_exprs)
{
	QualDesc   *q = palloc0(sizeof(QualDesc));
	int			exprindex = intVal(list_nth(private, QualPrivateExprIndex));

	q->attnum = intVal(list_nth(private, QualPrivateAttnum));
	q->opname = strVal(list_nth(private, QualPrivateOpname));
	q->listkind = intVal(list_nth(private, QualPrivateListKind));
	q->valkind = intVal(list_nth(private, QualPrivateValueKind));
	q->valtype = (Oid) intVal(list_nth(private, QualPrivateValueType));
	q->expr = exprindex >= 0 ? list_nth(fdw_exprs, exprindex) : NULL;
	q->exprindex = exprindex;
	return q;
}

static PyObject *
make_py_qual(PyObject *qual_class, QualDesc *q, TupleDesc tupdesc, Datum value, bool isnull)
{
	Form_pg_attribute att = TupleDescAttr(tupdesc, q->attnum - 1);
	PyObject   *operator;
	PyObject   *pyvalue;
	PyObject   *res;

	if (q->listkind == QUAL_LIST_NONE)
		operator = PyUnicode_FromString(q->opname);
	else
		operator = Py_BuildValue("(sO)", q->opname,
								 q->listkind == QUAL_LIST_ANY ? Py_True : Py_False);
	if (q->valkind == QUAL_VALUE_EXPR)
		pyvalue = pyhost_datum_to_python(value, isnull, q->valtype);
	else
	{
		Py_INCREF(Py_None);
		pyvalue = Py_None;
	}
	if (operator == NULL || pyvalue == NULL)
	{
		Py_XDECREF(operator);
		Py_XDECREF(pyvalue);
		pyhost_report_error("building a Qual");
	}
	res = PyObject_CallFunction(qual_class, "sNN", NameStr(att->attname), operator, pyvalue);
	return pyhost_check(res, "Qual()");
}

PyObject *
pyhost_quals_to_python(List *quals, TupleDesc tupdesc, Datum *values, bool *nulls, bool *skip)
{
	PyObject   *qual_class = pyhost_check(PyObject_GetAttrString(pyhost_api_module(), "Qual"),
										  "multicorn_api.Qual");
	PyObject   *list = PyList_New(0);
	ListCell   *lc;

	foreach(lc, quals)
	{
		int			i = foreach_current_index(lc);
		PyObject   *q;

		if (skip && skip[i])
			continue;
		q = make_py_qual(qual_class, lfirst(lc), tupdesc, values ? values[i] : (Datum) 0,
						 nulls ? nulls[i] : true);
		PyList_Append(list, q);
		Py_DECREF(q);
	}
	Py_DECREF(qual_class);
	return list;
}

PyObject *
pyhost_plan_quals_to_python(PlannerInfo *root, List *quals, TupleDesc tupdesc)
{
	int			n = list_length(quals);
	Datum	   *values = palloc0(sizeof(Datum) * (n + 1));
	bool	   *nulls = palloc0(sizeof(bool) * (n + 1));
	bool	   *skip = palloc0(sizeof(bool) * (n + 1));
	ListCell   *lc;

	foreach(lc, quals)
	{
		QualDesc   *q = lfirst(lc);
		int			i = foreach_current_index(lc);
		Node	   *expr = strip_relabel((Node *) q->expr);

		if (q->valkind != QUAL_VALUE_EXPR)
			continue;

		/*
		 * While planning, fold what can be known now (now() - interval '1h',
		 * bound parameters of a custom plan) so that estimates see the value;
		 * execution evaluates the real expression again.
		 */
		if (root != NULL && expr && !IsA(expr, Const))
			expr = strip_relabel(estimate_expression_value(root, expr));
		if (expr && IsA(expr, Const))
		{
			values[i] = ((Const *) expr)->constvalue;
			nulls[i] = ((Const *) expr)->constisnull;
		}
		else
			skip[i] = true;
	}
	return pyhost_quals_to_python(quals, tupdesc, values, nulls, skip);
}
