/*-------------------------------------------------------------------------
 *
 * modify.c
 *		  INSERT, UPDATE and DELETE through the wrapper's writable API, as
 *		  multicorn2 calls it.
 *
 * The wrapper names its `rowid_column`; UPDATE and DELETE fetch it with
 * every row (a row identity column of the scan), then call
 * update(rowid, newvalues) and delete(rowid).  INSERT calls
 * insert(values), or bulk_insert(list) with batches of modify_batch_size
 * rows when that is above 1 (not with RETURNING, whose rows a batch cannot
 * give back).  values and newvalues are dicts of every column.  A dict
 * returned by insert/update is the row as stored (RETURNING shows it);
 * None means the values as given.  A DELETE ... RETURNING shows the deleted
 * row as the scan read it.  end_modify() is called when the statement's
 * modification ends.
 *
 * IDENTIFICATION
 *		  ext/modify.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "access/htup_details.h"
#include "executor/executor.h"
#include "foreign/fdwapi.h"
#include "nodes/makefuncs.h"
#include "optimizer/appendinfo.h"
#include "utils/rel.h"

typedef struct ModifyState
{
	PyObject   *instance;
	Oid			relid;
	TupleDesc	tupdesc;
	PyhostColumnConv *convs;	/* per attribute */
	AttrNumber	rowid_junk;		/* in the subplan's output; invalid for INSERT */
	Oid			rowid_type;
	AttrNumber	wholerow_junk;	/* DELETE ... RETURNING: the row as read */
	MemoryContext row_cxt;		/* reset per row */
} ModifyState;

/* The wrapper's rowid_column (palloc'd), or ERROR. */
static char *
rowid_column(PyObject *instance)
{
	PyObject   *name = pyhost_check(PyObject_GetAttrString(instance, "rowid_column"),
									"rowid_column");
	const char *s;
	char	   *res;

	if (!PyUnicode_Check(name))
	{
		Py_DECREF(name);
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_ATTRIBUTE_VALUE),
				 errmsg("rowid_column must be a column name")));
	}
	s = PyUnicode_AsUTF8(name);
	res = pstrdup(s ? s : "");
	Py_DECREF(name);
	return res;
}

static Form_pg_attribute
find_column(TupleDesc tupdesc, const char *name)
{
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);

		if (!att->attisdropped && strcmp(NameStr(att->attname), name) == 0)
			return att;
	}
	return NULL;
}

static void
pyhostAddForeignUpdateTargets(PlannerInfo *root, Index rtindex, RangeTblEntry *target_rte,
							  Relation target_relation)
{
	PyObject   *instance = pyhost_get_instance(RelationGetRelid(target_relation), NULL);
	char	   *name;
	Form_pg_attribute att;

	pyhost_xact_use(RelationGetRelid(target_relation), instance);
	name = rowid_column(instance);
	att = find_column(RelationGetDescr(target_relation), name);
	if (att == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_COLUMN_NAME_NOT_FOUND),
				 errmsg("The rowid attribute does not exist"),
				 errhint("The wrapper's rowid_column is \"%s\"; the foreign table has no such column.",
						 name)));
	add_row_identity_var(root, makeVar(rtindex, att->attnum, att->atttypid, att->atttypmod,
									   att->attcollation, 0),
						 rtindex, name);
	/* DELETE ... RETURNING shows the row as read, unless delete() returns one */
	if (root->parse->commandType == CMD_DELETE && root->parse->returningList != NIL)
		add_row_identity_var(root, makeWholeRowVar(target_rte, rtindex, 0, false),
							 rtindex, "wholerow");
}

static List *
pyhostPlanForeignModify(PlannerInfo *root, ModifyTable *plan, Index resultRelation,
						int subplan_index)
{
	return NIL;
}

static void
pyhostBeginForeignModify(ModifyTableState *mtstate, ResultRelInfo *rinfo, List *fdw_private,
						 int subplan_index, int eflags)
{
	Relation	rel = rinfo->ri_RelationDesc;
	ModifyState *ms = palloc0(sizeof(ModifyState));
	CmdType		op = mtstate->operation;

	ms->relid = RelationGetRelid(rel);
	ms->tupdesc = RelationGetDescr(rel);
	ms->instance = pyhost_get_instance(ms->relid, NULL);
	Py_INCREF(ms->instance);
	pyhost_xact_use(ms->relid, ms->instance);
	ms->convs = palloc0(sizeof(PyhostColumnConv) * ms->tupdesc->natts);
	for (int i = 0; i < ms->tupdesc->natts; i++)
		pyhost_init_column_conv(&ms->convs[i], TupleDescAttr(ms->tupdesc, i));
	ms->row_cxt = AllocSetContextCreate(CurrentMemoryContext, "otelspans modify row",
										ALLOCSET_SMALL_SIZES);
	if (op == CMD_UPDATE || op == CMD_DELETE)
	{
		Plan	   *subplan = outerPlanState(mtstate)->plan;
		char	   *name = rowid_column(ms->instance);
		Form_pg_attribute att = find_column(ms->tupdesc, name);

		ms->rowid_junk = ExecFindJunkAttributeInTlist(subplan->targetlist, name);
		if (!AttributeNumberIsValid(ms->rowid_junk) || att == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_COLUMN_NAME_NOT_FOUND),
					 errmsg("The rowid_column could not be identified")));
		ms->rowid_type = att->atttypid;
		ms->wholerow_junk = ExecFindJunkAttributeInTlist(subplan->targetlist, "wholerow");
	}
	rinfo->ri_FdwState = ms;
}

/* The slot's row as a dict of every column (None for NULL). */
static PyObject *
slot_to_dict(ModifyState *ms, TupleTableSlot *slot)
{
	PyObject   *dict = PyDict_New();

	slot_getallattrs(slot);
	for (int i = 0; i < ms->tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(ms->tupdesc, i);
		PyObject   *v;

		if (att->attisdropped)
			continue;
		v = pyhost_check(pyhost_datum_to_python(slot->tts_values[i], slot->tts_isnull[i],
												att->atttypid),
						 "converting a value for the wrapper");
		PyDict_SetItemString(dict, NameStr(att->attname), v);
		Py_DECREF(v);
	}
	return dict;
}

/* A row returned by insert/update/delete (a mapping) replaces the slot's values. */
static void
result_to_slot(ModifyState *ms, PyObject *row, TupleTableSlot *slot)
{
	if (!PyMapping_Check(row) || PySequence_Check(row))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("a modified row must be returned as a dict, not %s", Py_TYPE(row)->tp_name),
				 errhint("Return the row as stored (a dict of column values), or None.")));
	ExecClearTuple(slot);
	for (int i = 0; i < ms->tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(ms->tupdesc, i);
		PyObject   *v;

		slot->tts_isnull[i] = true;
		slot->tts_values[i] = (Datum) 0;
		if (att->attisdropped)
			continue;
		v = PyMapping_GetItemString(row, NameStr(att->attname));
		if (v == NULL)
		{
			PyErr_Clear();		/* a missing column is NULL */
			continue;
		}
		slot->tts_values[i] = pyhost_python_to_datum(v, &ms->convs[i], &slot->tts_isnull[i]);
		Py_DECREF(v);
	}
	ExecStoreVirtualTuple(slot);
}

static PyObject *
call_method(ModifyState *ms, const char *name, PyObject *args)
{
	PyObject   *method = pyhost_check(PyObject_GetAttrString(ms->instance, name), name);
	PyObject   *res;

	pyhost_enter();
	res = PyObject_Call(method, args, NULL);
	pyhost_leave();
	Py_DECREF(method);
	Py_DECREF(args);
	return pyhost_check(res, name);
}

static PyObject *
rowid_value(ModifyState *ms, TupleTableSlot *planSlot)
{
	bool		isnull;
	Datum		d = ExecGetJunkAttribute(planSlot, ms->rowid_junk, &isnull);

	return pyhost_check(pyhost_datum_to_python(d, isnull, ms->rowid_type), "rowid");
}

static TupleTableSlot *
pyhostExecForeignInsert(EState *estate, ResultRelInfo *rinfo, TupleTableSlot *slot,
						TupleTableSlot *planSlot)
{
	ModifyState *ms = rinfo->ri_FdwState;
	PyObject   *res = call_method(ms, "insert", Py_BuildValue("(N)", slot_to_dict(ms, slot)));

	if (res != Py_None)
		result_to_slot(ms, res, slot);
	Py_DECREF(res);
	return slot;
}

static TupleTableSlot **
pyhostExecForeignBatchInsert(EState *estate, ResultRelInfo *rinfo, TupleTableSlot **slots,
							 TupleTableSlot **planSlots, int *numSlots)
{
	ModifyState *ms = rinfo->ri_FdwState;
	PyObject   *rows = PyList_New(0);
	PyObject   *res;

	for (int i = 0; i < *numSlots; i++)
	{
		PyObject   *d = slot_to_dict(ms, slots[i]);

		PyList_Append(rows, d);
		Py_DECREF(d);
	}
	res = call_method(ms, "bulk_insert", Py_BuildValue("(N)", rows));
	if (res != Py_None)
	{
		if (!PyList_Check(res) || PyList_GET_SIZE(res) != *numSlots)
		{
			Py_DECREF(res);
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
					 errmsg("Returned list size does not match number of inserted values")));
		}
		for (int i = 0; i < *numSlots; i++)
			result_to_slot(ms, PyList_GET_ITEM(res, i), slots[i]);
	}
	Py_DECREF(res);
	return slots;
}

static int
pyhostGetForeignModifyBatchSize(ResultRelInfo *rinfo)
{
	ModifyState *ms = rinfo->ri_FdwState;
	PyObject   *v;
	long		n = 1;

	if (ms == NULL)
		return 1;				/* COPY or tuple routing: no BeginForeignModify */
	v = PyObject_GetAttrString(ms->instance, "modify_batch_size");

	if (v == NULL)
		PyErr_Clear();			/* a wrapper not derived from ForeignDataWrapper */
	else
	{
		n = PyLong_AsLong(v);
		Py_DECREF(v);
		if (n == -1 && PyErr_Occurred())
			pyhost_report_error("modify_batch_size");
	}
	/*
	 * A batch returns no RETURNING rows, so RETURNING goes row by row.  AFTER
	 * ROW triggers see the rows bulk_insert returns, as under multicorn2.
	 */
	if (rinfo->ri_projectReturning || rinfo->ri_WithCheckOptions)
		return 1;
	return n > 1 ? (int) Min(n, 10000) : 1;
}

static TupleTableSlot *
pyhostExecForeignUpdate(EState *estate, ResultRelInfo *rinfo, TupleTableSlot *slot,
						TupleTableSlot *planSlot)
{
	ModifyState *ms = rinfo->ri_FdwState;
	PyObject   *res = call_method(ms, "update",
								  Py_BuildValue("(NN)", rowid_value(ms, planSlot),
												slot_to_dict(ms, slot)));

	if (res != Py_None)
		result_to_slot(ms, res, slot);
	Py_DECREF(res);
	return slot;
}

static TupleTableSlot *
pyhostExecForeignDelete(EState *estate, ResultRelInfo *rinfo, TupleTableSlot *slot,
						TupleTableSlot *planSlot)
{
	ModifyState *ms = rinfo->ri_FdwState;
	PyObject   *res = call_method(ms, "delete", Py_BuildValue("(N)", rowid_value(ms, planSlot)));

	if (res != Py_None)
		result_to_slot(ms, res, slot);
	else if (AttributeNumberIsValid(ms->wholerow_junk))
	{
		bool		isnull;
		Datum		d = ExecGetJunkAttribute(planSlot, ms->wholerow_junk, &isnull);

		ExecClearTuple(slot);
		if (!isnull)
		{
			HeapTupleHeader th = DatumGetHeapTupleHeader(d);
			HeapTupleData tuple;

			tuple.t_len = HeapTupleHeaderGetDatumLength(th);
			ItemPointerSetInvalid(&tuple.t_self);
			tuple.t_tableOid = ms->relid;
			tuple.t_data = th;
			ExecForceStoreHeapTuple(&tuple, slot, false);
			/* own copy: the row lives in the subplan's slot, reused for the next row */
			ExecMaterializeSlot(slot);
		}
	}
	Py_DECREF(res);
	return slot;
}

static void
pyhostEndForeignModify(EState *estate, ResultRelInfo *rinfo)
{
	ModifyState *ms = rinfo->ri_FdwState;

	if (ms == NULL || ms->instance == NULL)
		return;
	pyhost_call_hook(ms->instance, "end_modify");
	Py_CLEAR(ms->instance);
}

void
pyhost_modify_routine(FdwRoutine *routine)
{
	routine->AddForeignUpdateTargets = pyhostAddForeignUpdateTargets;
	routine->PlanForeignModify = pyhostPlanForeignModify;
	routine->BeginForeignModify = pyhostBeginForeignModify;
	routine->ExecForeignInsert = pyhostExecForeignInsert;
	routine->ExecForeignBatchInsert = pyhostExecForeignBatchInsert;
	routine->GetForeignModifyBatchSize = pyhostGetForeignModifyBatchSize;
	routine->ExecForeignUpdate = pyhostExecForeignUpdate;
	routine->ExecForeignDelete = pyhostExecForeignDelete;
	routine->EndForeignModify = pyhostEndForeignModify;
}
