/*-------------------------------------------------------------------------
 *
 * xact.c
 *		  Transaction hooks of the wrappers: begin, pre_commit, commit,
 *		  rollback, sub_begin, sub_commit, sub_rollback (and end_scan,
 *		  end_modify), with multicorn2's semantics.
 *
 * A wrapper instance joins the current transaction the first time the
 * backend uses it in that transaction (planning, a scan, a modify): then
 * begin(serializable) is called, and sub_begin(level) once for every
 * savepoint level it has not seen yet (level 2 is the first savepoint).  At
 * the end of a subtransaction the instances that joined at that level or
 * deeper get sub_commit(level) (RELEASE) or sub_rollback(level) (ROLLBACK
 * TO, or an error in the savepoint); at the end of the transaction
 * pre_commit() then commit(), or rollback().
 *
 * An exception in begin, sub_begin, pre_commit or sub_commit is an ERROR
 * (so a failing pre_commit aborts the commit); in commit, rollback and
 * sub_rollback it can only be a WARNING: the outcome is decided.
 *
 * IDENTIFICATION
 *		  ext/xact.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include "access/xact.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

typedef struct XactEntry
{
	Oid			relid;			/* hash key */
	PyObject   *instance;		/* strong reference while in a transaction */
	int			depth;			/* nesting level reached; 0: not in a transaction */
} XactEntry;

static HTAB *xact_entries = NULL;

static void xact_callback(XactEvent event, void *arg);
static void subxact_callback(SubXactEvent event, SubTransactionId mySubid,
							 SubTransactionId parentSubid, void *arg);

/*
 * Call instance.name(*args) if the wrapper has that method.  With `fatal`
 * an exception is an ERROR, else a WARNING (the outcome is already decided).
 */
static void
call_hook(PyObject *instance, const char *name, PyObject *args, bool fatal)
{
	PyObject   *method;
	PyObject   *res;

	if (!PyObject_HasAttrString(instance, name))
		return;
	method = PyObject_GetAttrString(instance, name);
	if (method == NULL)
		pyhost_report_error(name);
	pyhost_enter();
	res = args ? PyObject_Call(method, args, NULL) : PyObject_CallNoArgs(method);
	pyhost_leave();
	Py_DECREF(method);
	if (res != NULL)
	{
		Py_DECREF(res);
		return;
	}
	if (fatal)
		pyhost_report_error(name);
	else
	{
		PyObject   *type,
				   *value,
				   *tb;
		PyObject   *text;

		PyErr_Fetch(&type, &value, &tb);
		text = value ? PyObject_Str(value) : NULL;
		ereport(WARNING,
				(errmsg("wrapper %s() failed: %s", name,
						text && PyUnicode_Check(text) ? PyUnicode_AsUTF8(text) : "?")));
		Py_XDECREF(text);
		Py_XDECREF(type);
		Py_XDECREF(value);
		Py_XDECREF(tb);
		PyErr_Clear();
	}
}

void
pyhost_call_hook(PyObject *instance, const char *name)
{
	call_hook(instance, name, NULL, true);
}

void
pyhost_xact_use(Oid relid, PyObject *instance)
{
	XactEntry  *entry;
	bool		found;
	int			level = GetCurrentTransactionNestLevel();

	if (xact_entries == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(XactEntry);
		ctl.hcxt = TopMemoryContext;
		xact_entries = hash_create("otelspans transaction members", 16, &ctl,
								   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		RegisterXactCallback(xact_callback, NULL);
		RegisterSubXactCallback(subxact_callback, NULL);
	}
	entry = hash_search(xact_entries, &relid, HASH_ENTER, &found);
	if (!found)
	{
		entry->instance = NULL;
		entry->depth = 0;
	}
	if (entry->instance != instance)
	{
		/* a rebuilt instance (ALTER ... OPTIONS) joins as a new member */
		Py_XDECREF(entry->instance);
		Py_INCREF(instance);
		entry->instance = instance;
		entry->depth = 0;
	}
	if (entry->depth <= 0)
	{
		PyObject   *args = Py_BuildValue("(O)", IsolationIsSerializable() ? Py_True : Py_False);

		entry->depth = 1;
		call_hook(instance, "begin", args, true);
		Py_DECREF(args);
	}
	while (entry->depth < level)
	{
		PyObject   *args;

		entry->depth++;
		args = Py_BuildValue("(i)", entry->depth);
		call_hook(instance, "sub_begin", args, true);
		Py_DECREF(args);
	}
}

static void
forget(XactEntry *entry)
{
	Py_CLEAR(entry->instance);
	hash_search(xact_entries, &entry->relid, HASH_REMOVE, NULL);
}

static void
xact_callback(XactEvent event, void *arg)
{
	HASH_SEQ_STATUS status;
	XactEntry  *entry;

	if (event != XACT_EVENT_PRE_COMMIT && event != XACT_EVENT_COMMIT &&
		event != XACT_EVENT_ABORT)
		return;
	hash_seq_init(&status, xact_entries);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->depth <= 0 || entry->instance == NULL)
			continue;
		switch (event)
		{
			case XACT_EVENT_PRE_COMMIT:
				call_hook(entry->instance, "pre_commit", NULL, true);
				break;
			case XACT_EVENT_COMMIT:
				call_hook(entry->instance, "commit", NULL, false);
				forget(entry);
				break;
			default:
				call_hook(entry->instance, "rollback", NULL, false);
				forget(entry);
				break;
		}
	}
}

static void
subxact_callback(SubXactEvent event, SubTransactionId mySubid,
				 SubTransactionId parentSubid, void *arg)
{
	HASH_SEQ_STATUS status;
	XactEntry  *entry;
	int			level;

	if (event != SUBXACT_EVENT_PRE_COMMIT_SUB && event != SUBXACT_EVENT_ABORT_SUB)
		return;
	level = GetCurrentTransactionNestLevel();
	hash_seq_init(&status, xact_entries);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		PyObject   *args;

		if (entry->depth < level || entry->instance == NULL)
			continue;
		args = Py_BuildValue("(i)", level);
		if (event == SUBXACT_EVENT_PRE_COMMIT_SUB)
			call_hook(entry->instance, "sub_commit", args, true);
		else
			call_hook(entry->instance, "sub_rollback", args, false);
		Py_DECREF(args);
		entry->depth = level - 1;
	}
}
