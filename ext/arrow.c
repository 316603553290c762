/*-------------------------------------------------------------------------
 *
 * arrow.c
 *		  The bulk path: Arrow data returned by a wrapper, turned into tuples
 *		  column by column.
 *
 * A wrapper's execute() may return an object with __arrow_c_stream__ (a
 * pyarrow Table or RecordBatchReader, a polars or duckdb result, ...) or an
 * iterable of objects with __arrow_c_array__ (record batches).  We take the
 * Arrow C Data Interface structures out of their PyCapsules and read the
 * buffers directly; no Arrow library is linked.
 *
 * Design notes:
 *
 * - The schema is resolved once (once per distinct schema for a batch
 *	 iterator): every projected column is matched by name to a field of the
 *	 top-level struct, and a conversion is chosen from the field's format and
 *	 the column's type.  Incompatible types and missing columns are reported
 *	 here, before any row is produced.
 *
 * - Rows are converted in chunks of up to ARROW_CHUNK_ROWS rows, one column
 *	 at a time: a tight loop per (conversion, physical type), no per-row
 *	 dispatch.  The chunk's Datums are kept row-major, so arrow_scan_next is
 *	 two memcpys.  Strings, binaries and uuids of a chunk are bump-allocated
 *	 in one buffer that is reused by the next chunk; strings get a short
 *	 (1-byte) varlena header when they fit, exactly as heap tuples do.  A
 *	 chunk's memory is dead when the next one is converted, which is the same
 *	 lifetime as the scan's per-tuple memory.
 *
 * - Dictionary-encoded columns have their dictionary converted once per batch;
 *	 rows then only look up the index.
 *
 * - Ownership: the structures are moved out of their capsules (the capsule's
 *	 copy gets release = NULL) and released exactly once, by arrow_scan_end or
 *	 by a reset callback of the scan's memory context, so that an ERROR in the
 *	 middle of a scan (ours, or one from the executor above us) leaks nothing.
 *
 * IDENTIFICATION
 *		  ext/arrow.c
 *
 *-------------------------------------------------------------------------
 */
#include "otelspans.h"

#include <limits.h>

#include "catalog/pg_type.h"
#include "common/int.h"
#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* ---------------------------------------------------------------------
 * The Arrow C Data Interface and C Stream Interface, as the spec gives them
 * (https://arrow.apache.org/docs/format/CDataInterface.html).  The guards
 * let another definition of the same ABI take precedence.
 * ---------------------------------------------------------------------
 */
#ifndef ARROW_C_DATA_INTERFACE
#define ARROW_C_DATA_INTERFACE

#define ARROW_FLAG_DICTIONARY_ORDERED 1
#define ARROW_FLAG_NULLABLE 2
#define ARROW_FLAG_MAP_KEYS_SORTED 4

struct ArrowSchema
{
	/* Array type description */
	const char *format;
	const char *name;
	const char *metadata;
	int64_t		flags;
	int64_t		n_children;
	struct ArrowSchema **children;
	struct ArrowSchema *dictionary;

	/* Release callback */
	void		(*release) (struct ArrowSchema *);
	/* Opaque producer-specific data */
	void	   *private_data;
};

struct ArrowArray
{
	/* Array data description */
	int64_t		length;
	int64_t		null_count;
	int64_t		offset;
	int64_t		n_buffers;
	int64_t		n_children;
	const void **buffers;
	struct ArrowArray **children;
	struct ArrowArray *dictionary;

	/* Release callback */
	void		(*release) (struct ArrowArray *);
	/* Opaque producer-specific data */
	void	   *private_data;
};

#endif							/* ARROW_C_DATA_INTERFACE */

#ifndef ARROW_C_STREAM_INTERFACE
#define ARROW_C_STREAM_INTERFACE

struct ArrowArrayStream
{
	int			(*get_schema) (struct ArrowArrayStream *, struct ArrowSchema *out);
	int			(*get_next) (struct ArrowArrayStream *, struct ArrowArray *out);
	const char *(*get_last_error) (struct ArrowArrayStream *);

	/* Release callback */
	void		(*release) (struct ArrowArrayStream *);
	/* Opaque producer-specific data */
	void	   *private_data;
};

#endif							/* ARROW_C_STREAM_INTERFACE */

/* PyCapsule names of the Arrow PyCapsule Interface. */
#define CAPSULE_SCHEMA	"arrow_schema"
#define CAPSULE_ARRAY	"arrow_array"
#define CAPSULE_STREAM	"arrow_array_stream"

/* Rows converted at a time, and the bytes of strings a chunk may copy. */
#define ARROW_CHUNK_ROWS	1024
#define ARROW_CHUNK_BYTES	(8 * 1024 * 1024)

/* Microseconds from 1970-01-01 (Arrow) to 2000-01-01 (PostgreSQL). */
#define EPOCH_DIFF_DAYS		((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE))
#define EPOCH_DIFF_USECS	(EPOCH_DIFF_DAYS * USECS_PER_DAY)

#define BIT_IS_SET(bitmap, i) \
	((((const uint8 *) (bitmap))[(i) >> 3] >> ((i) & 7)) & 1)

/* Physical layout of an Arrow field, from its format string. */
typedef enum ArrowSource
{
	SRC_UNSUPPORTED,
	SRC_NULL,					/* n */
	SRC_BOOL,					/* b */
	SRC_INT8,					/* c */
	SRC_INT16,					/* s */
	SRC_INT32,					/* i */
	SRC_INT64,					/* l */
	SRC_UINT8,					/* C */
	SRC_UINT16,					/* S */
	SRC_UINT32,					/* I */
	SRC_UINT64,					/* L */
	SRC_FLOAT32,				/* f */
	SRC_FLOAT64,				/* g */
	SRC_UTF8,					/* u */
	SRC_LARGE_UTF8,				/* U */
	SRC_BINARY,					/* z */
	SRC_LARGE_BINARY,			/* Z */
	SRC_FIXED_BINARY,			/* w:N */
	SRC_DATE32,					/* tdD */
	SRC_DATE64,					/* tdm */
	SRC_TIME32,					/* tts, ttm */
	SRC_TIME64,					/* ttu, ttn */
	SRC_TIMESTAMP,				/* ts[smun]:tz */
	SRC_DECIMAL					/* d:P,S[,bits] */
} ArrowSource;

/* Time units, in the order of the format letters s, m, u, n. */
typedef enum ArrowUnit
{
	UNIT_SECOND,
	UNIT_MILLI,
	UNIT_MICRO,
	UNIT_NANO
} ArrowUnit;

/* What a column's PostgreSQL type asks for (its base type for domains). */
typedef enum ArrowTarget
{
	TARGET_BOOL,
	TARGET_INT2,
	TARGET_INT4,
	TARGET_INT8,
	TARGET_FLOAT4,
	TARGET_FLOAT8,
	TARGET_NUMERIC,
	TARGET_TEXT,				/* text, unconstrained varchar */
	TARGET_BYTEA,
	TARGET_UUID,
	TARGET_DATE,
	TARGET_TIMESTAMP,
	TARGET_TIMESTAMPTZ,
	TARGET_TIME,
	TARGET_OTHER				/* anything else: strings via the input function */
} ArrowTarget;

/* The conversion chosen for a (source, target) pair. */
typedef enum ArrowConv
{
	CONV_NONE,					/* incompatible */
	CONV_NULL,					/* Arrow null type: every value is NULL */
	CONV_BOOL,
	CONV_INT,					/* integers to int2/int4/int8 (widening) */
	CONV_INT_FLOAT,				/* integers to float4/float8 */
	CONV_INT_NUMERIC,
	CONV_FLOAT,					/* float32/64 to float4/float8 */
	CONV_FLOAT_NUMERIC,
	CONV_DECIMAL,				/* decimal32/64/128 to numeric */
	CONV_TEXT,					/* utf8 to text */
	CONV_STR_INPUT,				/* utf8 through the type's input function */
	CONV_BYTEA,					/* binary to bytea */
	CONV_FIXED_BYTEA,			/* fixed-size binary to bytea */
	CONV_UUID,					/* fixed-size binary(16) to uuid */
	CONV_DATE,
	CONV_TIME,
	CONV_TIMESTAMP				/* to timestamp or timestamptz */
} ArrowConv;

/* One projected column of the foreign table. */
typedef struct ArrowColumn
{
	/* from the table, set once */
	int			attno;			/* 0-based attribute number */
	char	   *attname;
	Oid			typid;			/* the column's type (maybe a domain) */
	int32		typmod;
	ArrowTarget target;
	bool		inflinfo_ready;
	FmgrInfo	inflinfo;		/* input function, for CONV_STR_INPUT */
	Oid			typioparam;

	/* from the schema, set when it is resolved */
	int			field;			/* index of the Arrow field */
	ArrowSource src;			/* values (dictionary values if encoded) */
	ArrowSource index_src;		/* dictionary indices, else SRC_UNSUPPORTED */
	ArrowConv	conv;
	ArrowUnit	unit;
	bool		has_tz;
	int			width;			/* fixed-size binary width */
	int			dec_scale;
	int			dec_bits;

	/* from the current batch */
	const struct ArrowArray *arr;	/* the field's array (the indices) */
	int64		base;			/* index of the batch's row 0 in arr */
	const uint8 *validity;		/* NULL when every slot is valid */
	const char *vardata;		/* string/binary data buffer */
	Datum	   *dict_values;	/* dictionary: converted values */
	bool	   *dict_nulls;
	int64		dict_len;
} ArrowColumn;

struct ArrowScan
{
	MemoryContext mcxt;			/* owner: the scan's context */
	MemoryContext schema_cxt;	/* what a schema resolution allocates */
	MemoryContext batch_cxt;	/* reset per batch: converted dictionaries */
	MemoryContext chunk_cxt;	/* reset per chunk: palloc'd values */
	MemoryContextCallback release_cb;

	int			natts;
	int			ncols;
	ArrowColumn *cols;			/* projected columns only */
	bool		server_utf8;	/* database encoding is UTF8 */

	/* source: a stream, or an iterator of batches */
	bool		is_stream;
	struct ArrowArrayStream stream; /* release == NULL when none */
	PyObject   *iter;			/* batch iterator (strong reference) */
	bool		done;

	/* schema being resolved (released right after) */
	struct ArrowSchema schema;
	bool		resolved;
	int			nfields;
	char	  **field_formats;	/* signature of the resolved schema */
	char	  **field_names;
	char	  **field_dict_formats; /* NULL entries when not encoded */

	/* current batch */
	struct ArrowArray batch;	/* release == NULL when none */
	const uint8 *row_validity;	/* the struct's own validity, usually NULL */
	int64		batch_pos;		/* next row of the batch to convert */
	int64		batch_len;

	/* current chunk: row-major values of every attribute */
	int			chunk_rows;
	Datum	   *values;
	bool	   *nulls;
	int			chunk_pos;
	int			chunk_len;
	char	   *arena;			/* strings, binaries, uuids of the chunk */
	Size		arena_size;

	ArrowColumn *cur_col;		/* for the error context */
};

/* Resources */
static void arrow_scan_release(void *arg);
static void release_batch(ArrowScan *scan);
static void release_schema(ArrowScan *scan);
static ArrowScan *scan_create(TupleDesc tupdesc, const bool *needed, MemoryContext mcxt,
							  bool is_stream);

/* Schema */
static ArrowSource parse_format(const char *format, ArrowColumn *col);
static char *arrow_type_name(const struct ArrowSchema *schema);
static char *arrow_format_name(const char *format);
static ArrowTarget target_for_type(Oid typid, int32 typmod);
static ArrowConv choose_conv(ArrowTarget target, ArrowSource src, const ArrowColumn *col);
static bool schema_matches(ArrowScan *scan, const struct ArrowSchema *schema);
static void resolve_schema(ArrowScan *scan, const struct ArrowSchema *schema);

/* Batches and chunks */
static void take_batch(ArrowScan *scan, PyObject *obj);
static void report_stream_error(ArrowScan *scan, int rc, const char *what) pg_attribute_noreturn();
static bool fetch_batch(ArrowScan *scan);
static void bind_batch(ArrowScan *scan);
static bool load_chunk(ArrowScan *scan);
static Size arena_bound(ArrowScan *scan, ArrowColumn *col, const struct ArrowArray *arr,
						int64 first, int64 n);
static void fill_nulls(ArrowScan *scan, ArrowColumn *col, int64 first, int64 n,
					   bool *nulls, int stride);
static void convert_values(ArrowScan *scan, ArrowColumn *col, const struct ArrowArray *arr,
						   int64 first, int64 n, Datum *values, bool *nulls, int stride,
						   char **bump);
static void convert_dictionary(ArrowScan *scan, ArrowColumn *col);
static void arrow_error_callback(void *arg);
static void malformed(ArrowColumn *col, const char *what) pg_attribute_noreturn();
static void timestamp_out_of_range(ArrowColumn *col) pg_attribute_noreturn();


/* ---------------------------------------------------------------------
 * Python side: detection and capsules
 * ---------------------------------------------------------------------
 */

/*
 * arrow_has_stream
 *		Does obj implement the Arrow PyCapsule stream protocol?
 */
bool
arrow_has_stream(PyObject *obj)
{
	return PyObject_HasAttrString(obj, "__arrow_c_stream__");
}

/*
 * arrow_has_array
 *		Does obj implement the Arrow PyCapsule array protocol (a batch)?
 */
bool
arrow_has_array(PyObject *obj)
{
	return PyObject_HasAttrString(obj, "__arrow_c_array__");
}

/*
 * Report a pending Python exception after dropping `obj`.  The exception is
 * set aside while obj is deallocated, since capsule destructors may run.
 */
static void
report_error_dropping(PyObject *obj, const char *context)
{
	PyObject   *type,
			   *value,
			   *tb;

	PyErr_Fetch(&type, &value, &tb);
	Py_XDECREF(obj);
	PyErr_Restore(type, value, tb);
	pyhost_report_error(context);
}

/*
 * report_stream_error
 *		ERROR for a failed get_schema/get_next, with the stream's own message.
 *
 * Producers may append a lot to the message (pyarrow adds "Detail: Python
 * exception: Traceback ..." when a Python generator raised): the client gets
 * the first part, the server log all of it.
 */
static void
report_stream_error(ArrowScan *scan, int rc, const char *what)
{
	const char *msg = scan->stream.get_last_error ?
		scan->stream.get_last_error(&scan->stream) : NULL;
	char	   *head;
	const char *cut;

	if (msg == NULL || msg[0] == '\0')
		msg = strerror(rc);
	head = pstrdup(msg);
	cut = strstr(head, ". Detail: ");
	if (cut == NULL)
		cut = strchr(head, '\n');
	if (cut != NULL)
		head[cut - head] = '\0';
	ereport(ERROR,
			(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
			 errmsg("%s: %s", what, head),
			 strcmp(head, msg) != 0 ? errdetail_log("%s", msg) : 0));
}

/*
 * take_batch
 *		Move the schema and array of a batch object into the scan.
 *
 * The capsules keep their structures with release = NULL, which tells their
 * destructors that the data was moved; from here on we own the structures
 * and release them exactly once.
 */
static void
take_batch(ArrowScan *scan, PyObject *obj)
{
	PyObject   *res;
	PyObject   *schema_cap;
	PyObject   *array_cap;
	struct ArrowSchema *schema;
	struct ArrowArray *array;

	Assert(scan->batch.release == NULL && scan->schema.release == NULL);

	if (!arrow_has_array(obj))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("execute() yielded a %s after Arrow record batches",
						Py_TYPE(obj)->tp_name),
				 errhint("Yield only objects with __arrow_c_array__ (record batches), or only rows.")));

	pyhost_enter();
	res = PyObject_CallMethod(obj, "__arrow_c_array__", NULL);
	pyhost_leave();
	if (res == NULL)
		pyhost_report_error("__arrow_c_array__");
	if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 ||
		!PyCapsule_IsValid(PyTuple_GET_ITEM(res, 0), CAPSULE_SCHEMA) ||
		!PyCapsule_IsValid(PyTuple_GET_ITEM(res, 1), CAPSULE_ARRAY))
	{
		Py_DECREF(res);
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("__arrow_c_array__() of %s did not return a pair of \"%s\" and \"%s\" capsules",
						Py_TYPE(obj)->tp_name, CAPSULE_SCHEMA, CAPSULE_ARRAY)));
	}
	schema_cap = PyTuple_GET_ITEM(res, 0);
	array_cap = PyTuple_GET_ITEM(res, 1);
	schema = PyCapsule_GetPointer(schema_cap, CAPSULE_SCHEMA);
	array = PyCapsule_GetPointer(array_cap, CAPSULE_ARRAY);
	if (schema == NULL || array == NULL)
		report_error_dropping(res, "__arrow_c_array__");
	if (schema->release == NULL || array->release == NULL)
	{
		Py_DECREF(res);
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("__arrow_c_array__() of %s returned capsules that were already consumed",
						Py_TYPE(obj)->tp_name)));
	}

	scan->schema = *schema;
	schema->release = NULL;
	scan->batch = *array;
	array->release = NULL;
	Py_DECREF(res);
}

/* ---------------------------------------------------------------------
 * Resources
 * ---------------------------------------------------------------------
 */

static void
release_batch(ArrowScan *scan)
{
	if (scan->batch.release != NULL)
	{
		scan->batch.release(&scan->batch);
		scan->batch.release = NULL;
	}
	scan->batch_pos = scan->batch_len = 0;
	scan->chunk_pos = scan->chunk_len = 0;
}

static void
release_schema(ArrowScan *scan)
{
	if (scan->schema.release != NULL)
	{
		scan->schema.release(&scan->schema);
		scan->schema.release = NULL;
	}
}

/*
 * arrow_scan_release
 *		Release every Arrow structure and Python reference the scan holds.
 *
 * Registered as a reset callback of the scan's context, so it runs on
 * ERROR as well as on a normal end; it is idempotent, since arrow_scan_end
 * calls it first.  The producers' release callbacks (pyarrow's among them)
 * may touch Python objects: the backend's main thread always holds the GIL,
 * so this is safe as long as the interpreter is alive.
 */
static void
arrow_scan_release(void *arg)
{
	ArrowScan  *scan = (ArrowScan *) arg;

	scan->done = true;
	scan->chunk_pos = scan->chunk_len = 0;
	if (!Py_IsInitialized())
		return;
	release_batch(scan);
	release_schema(scan);
	if (scan->stream.release != NULL)
	{
		scan->stream.release(&scan->stream);
		scan->stream.release = NULL;
	}
	Py_CLEAR(scan->iter);
}

/*
 * scan_create
 *		The scan state, its contexts, and the release callback.
 *
 * The callback is registered before anything is moved out of Python, so an
 * ERROR at any later point releases what was taken.
 */
static ArrowScan *
scan_create(TupleDesc tupdesc, const bool *needed, MemoryContext mcxt, bool is_stream)
{
	ArrowScan  *scan;
	MemoryContext old;
	int			natts = tupdesc->natts;
	int			ncols = 0;

	old = MemoryContextSwitchTo(mcxt);
	scan = palloc0(sizeof(ArrowScan));
	scan->mcxt = mcxt;
	scan->is_stream = is_stream;
	scan->natts = natts;
	scan->server_utf8 = (GetDatabaseEncoding() == PG_UTF8);
	scan->release_cb.func = arrow_scan_release;
	scan->release_cb.arg = scan;
	MemoryContextRegisterResetCallback(mcxt, &scan->release_cb);

	scan->schema_cxt = AllocSetContextCreate(mcxt, "otelspans arrow schema",
											 ALLOCSET_SMALL_SIZES);
	scan->batch_cxt = AllocSetContextCreate(mcxt, "otelspans arrow batch",
											ALLOCSET_DEFAULT_SIZES);
	scan->chunk_cxt = AllocSetContextCreate(mcxt, "otelspans arrow chunk",
											ALLOCSET_DEFAULT_SIZES);

	scan->cols = palloc0(sizeof(ArrowColumn) * Max(natts, 1));
	for (int i = 0; i < natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);
		ArrowColumn *col;

		if ((needed != NULL && !needed[i]) || att->attisdropped)
			continue;
		col = &scan->cols[ncols++];
		col->attno = i;
		col->attname = pstrdup(NameStr(att->attname));
		col->typid = att->atttypid;
		col->typmod = att->atttypmod;
		col->target = target_for_type(att->atttypid, att->atttypmod);
		col->field = -1;
	}
	scan->ncols = ncols;

	/*
	 * Chunk buffers, row-major.  Attributes that are not projected stay NULL
	 * for the whole scan.  Wide tables get shorter chunks.
	 */
	scan->chunk_rows = Max(64, Min(ARROW_CHUNK_ROWS, 65536 / Max(natts, 1)));
	scan->values = palloc0(sizeof(Datum) * scan->chunk_rows * Max(natts, 1));
	scan->nulls = palloc(sizeof(bool) * scan->chunk_rows * Max(natts, 1));
	memset(scan->nulls, true, sizeof(bool) * scan->chunk_rows * Max(natts, 1));

	MemoryContextSwitchTo(old);
	return scan;
}

/*
 * arrow_scan_begin_stream
 *		Start reading an object with __arrow_c_stream__.
 */
ArrowScan *
arrow_scan_begin_stream(PyObject *source, TupleDesc tupdesc, const bool *needed,
						MemoryContext mcxt)
{
	ArrowScan  *scan = scan_create(tupdesc, needed, mcxt, true);
	PyObject   *cap;
	struct ArrowArrayStream *stream;
	int			rc;

	pyhost_enter();
	cap = PyObject_CallMethod(source, "__arrow_c_stream__", NULL);
	pyhost_leave();
	if (cap == NULL)
		pyhost_report_error("__arrow_c_stream__");
	if (!PyCapsule_IsValid(cap, CAPSULE_STREAM))
	{
		Py_DECREF(cap);
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("__arrow_c_stream__() of %s did not return an \"%s\" capsule",
						Py_TYPE(source)->tp_name, CAPSULE_STREAM)));
	}
	stream = PyCapsule_GetPointer(cap, CAPSULE_STREAM);
	if (stream == NULL)
		report_error_dropping(cap, "__arrow_c_stream__");
	if (stream->release == NULL)
	{
		Py_DECREF(cap);
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("__arrow_c_stream__() of %s returned a stream that was already consumed",
						Py_TYPE(source)->tp_name)));
	}
	scan->stream = *stream;
	stream->release = NULL;
	Py_DECREF(cap);

	pyhost_enter();
	rc = scan->stream.get_schema(&scan->stream, &scan->schema);
	pyhost_leave();
	if (rc != 0)
	{
		if (PyErr_Occurred())
			pyhost_report_error("reading the schema of the Arrow stream");
		CHECK_FOR_INTERRUPTS();
		report_stream_error(scan, rc, "could not read the schema of the Arrow stream");
	}
	resolve_schema(scan, &scan->schema);
	release_schema(scan);
	return scan;
}

/*
 * arrow_scan_begin_batches
 *		Start reading record batches: first_batch, then what `rest` yields.
 *
 * Both are borrowed; we keep a reference to the iterator only.
 */
ArrowScan *
arrow_scan_begin_batches(PyObject *first_batch, PyObject *rest, TupleDesc tupdesc,
						 const bool *needed, MemoryContext mcxt)
{
	ArrowScan  *scan = scan_create(tupdesc, needed, mcxt, false);

	if (rest != NULL)
	{
		Py_INCREF(rest);
		scan->iter = rest;
	}
	take_batch(scan, first_batch);
	resolve_schema(scan, &scan->schema);
	release_schema(scan);
	bind_batch(scan);
	return scan;
}

/*
 * arrow_scan_end
 *		Release everything now rather than when the context goes.
 */
void
arrow_scan_end(ArrowScan *scan)
{
	if (scan == NULL)
		return;
	arrow_scan_release(scan);
	MemoryContextReset(scan->batch_cxt);
	MemoryContextReset(scan->chunk_cxt);
}

/* ---------------------------------------------------------------------
 * Schema
 * ---------------------------------------------------------------------
 */

/*
 * parse_format
 *		The physical layout of a format string, with its parameters in col.
 */
static ArrowSource
parse_format(const char *format, ArrowColumn *col)
{
	if (format == NULL || format[0] == '\0')
		return SRC_UNSUPPORTED;
	if (format[1] == '\0')
	{
		switch (format[0])
		{
			case 'n':
				return SRC_NULL;
			case 'b':
				return SRC_BOOL;
			case 'c':
				return SRC_INT8;
			case 's':
				return SRC_INT16;
			case 'i':
				return SRC_INT32;
			case 'l':
				return SRC_INT64;
			case 'C':
				return SRC_UINT8;
			case 'S':
				return SRC_UINT16;
			case 'I':
				return SRC_UINT32;
			case 'L':
				return SRC_UINT64;
			case 'f':
				return SRC_FLOAT32;
			case 'g':
				return SRC_FLOAT64;
			case 'u':
				return SRC_UTF8;
			case 'U':
				return SRC_LARGE_UTF8;
			case 'z':
				return SRC_BINARY;
			case 'Z':
				return SRC_LARGE_BINARY;
			default:
				return SRC_UNSUPPORTED;
		}
	}
	if (format[0] == 'w' && format[1] == ':')
	{
		long		width = strtol(format + 2, NULL, 10);

		if (width <= 0 || width > INT_MAX / 2)
			return SRC_UNSUPPORTED;
		col->width = (int) width;
		return SRC_FIXED_BINARY;
	}
	if (format[0] == 'd' && format[1] == ':')
	{
		int			precision,
					scale,
					bits = 128;
		int			n = sscanf(format + 2, "%d,%d,%d", &precision, &scale, &bits);

		if (n < 2 || (bits != 32 && bits != 64 && bits != 128))
			return SRC_UNSUPPORTED;
		col->dec_scale = scale;
		col->dec_bits = bits;
		return SRC_DECIMAL;
	}
	if (format[0] == 't')
	{
		if (strcmp(format, "tdD") == 0)
			return SRC_DATE32;
		if (strcmp(format, "tdm") == 0)
			return SRC_DATE64;
		if (format[1] == 't' && format[2] != '\0' && format[3] == '\0')
		{
			switch (format[2])
			{
				case 's':
					col->unit = UNIT_SECOND;
					return SRC_TIME32;
				case 'm':
					col->unit = UNIT_MILLI;
					return SRC_TIME32;
				case 'u':
					col->unit = UNIT_MICRO;
					return SRC_TIME64;
				case 'n':
					col->unit = UNIT_NANO;
					return SRC_TIME64;
				default:
					return SRC_UNSUPPORTED;
			}
		}
		if (format[1] == 's' && format[2] != '\0' && format[3] == ':')
		{
			switch (format[2])
			{
				case 's':
					col->unit = UNIT_SECOND;
					break;
				case 'm':
					col->unit = UNIT_MILLI;
					break;
				case 'u':
					col->unit = UNIT_MICRO;
					break;
				case 'n':
					col->unit = UNIT_NANO;
					break;
				default:
					return SRC_UNSUPPORTED;
			}
			col->has_tz = (format[4] != '\0');
			return SRC_TIMESTAMP;
		}
	}
	return SRC_UNSUPPORTED;
}

static const char *
unit_name(char letter)
{
	switch (letter)
	{
		case 's':
			return "s";
		case 'm':
			return "ms";
		case 'u':
			return "us";
		case 'n':
			return "ns";
		default:
			return "?";
	}
}

/*
 * arrow_type_name
 *		A readable name of an Arrow type, in pyarrow's spelling, for messages.
 */
static char *
arrow_type_name(const struct ArrowSchema *schema)
{
	const char *f = schema->format ? schema->format : "";

	if (schema->dictionary != NULL)
		return psprintf("dictionary<values=%s, indices=%s>",
						arrow_type_name(schema->dictionary), arrow_format_name(f));
	return arrow_format_name(f);
}

/*
 * arrow_format_name
 *		The readable name of a format string (no dictionary).
 */
static char *
arrow_format_name(const char *f)
{
	const char *name = NULL;

	if (f[0] != '\0' && f[1] == '\0')
	{
		switch (f[0])
		{
			case 'n':
				name = "null";
				break;
			case 'b':
				name = "bool";
				break;
			case 'c':
				name = "int8";
				break;
			case 'C':
				name = "uint8";
				break;
			case 's':
				name = "int16";
				break;
			case 'S':
				name = "uint16";
				break;
			case 'i':
				name = "int32";
				break;
			case 'I':
				name = "uint32";
				break;
			case 'l':
				name = "int64";
				break;
			case 'L':
				name = "uint64";
				break;
			case 'e':
				name = "halffloat";
				break;
			case 'f':
				name = "float";
				break;
			case 'g':
				name = "double";
				break;
			case 'z':
				name = "binary";
				break;
			case 'Z':
				name = "large_binary";
				break;
			case 'u':
				name = "string";
				break;
			case 'U':
				name = "large_string";
				break;
		}
		if (name)
			return pstrdup(name);
	}
	if (strcmp(f, "vu") == 0)
		return pstrdup("string_view");
	if (strcmp(f, "vz") == 0)
		return pstrdup("binary_view");
	if (strncmp(f, "w:", 2) == 0)
		return psprintf("fixed_size_binary[%s]", f + 2);
	if (strncmp(f, "d:", 2) == 0)
	{
		int			precision = 0,
					scale = 0,
					bits = 128;

		(void) sscanf(f + 2, "%d,%d,%d", &precision, &scale, &bits);
		return psprintf("decimal%d(%d, %d)", bits, precision, scale);
	}
	if (strcmp(f, "tdD") == 0)
		return pstrdup("date32");
	if (strcmp(f, "tdm") == 0)
		return pstrdup("date64");
	if (strncmp(f, "tt", 2) == 0 && f[2] != '\0')
		return psprintf("time%s[%s]", (f[2] == 's' || f[2] == 'm') ? "32" : "64",
						unit_name(f[2]));
	if (strncmp(f, "ts", 2) == 0 && f[2] != '\0' && f[3] == ':')
	{
		if (f[4] == '\0')
			return psprintf("timestamp[%s]", unit_name(f[2]));
		return psprintf("timestamp[%s, tz=%s]", unit_name(f[2]), f + 4);
	}
	if (strncmp(f, "tD", 2) == 0 && f[2] != '\0')
		return psprintf("duration[%s]", unit_name(f[2]));
	if (strncmp(f, "ti", 2) == 0)
		return pstrdup("interval");
	if (strcmp(f, "+l") == 0)
		return pstrdup("list");
	if (strcmp(f, "+L") == 0)
		return pstrdup("large_list");
	if (strcmp(f, "+vl") == 0 || strcmp(f, "+vL") == 0)
		return pstrdup("list_view");
	if (strncmp(f, "+w:", 3) == 0)
		return psprintf("fixed_size_list[%s]", f + 3);
	if (strcmp(f, "+s") == 0)
		return pstrdup("struct");
	if (strcmp(f, "+m") == 0)
		return pstrdup("map");
	if (strncmp(f, "+u", 2) == 0)
		return pstrdup("union");
	if (strcmp(f, "+r") == 0)
		return pstrdup("run_end_encoded");
	return psprintf("format \"%s\"", f);
}

/*
 * target_for_type
 *		Classify a column type once per scan.
 *
 * Domains convert like their base type (their constraints are not checked,
 * as with any foreign table).  Types with a typmod that their input
 * function enforces (varchar(n), bpchar, name) go through it.
 */
static ArrowTarget
target_for_type(Oid typid, int32 typmod)
{
	Oid			base = getBaseTypeAndTypmod(typid, &typmod);

	switch (base)
	{
		case BOOLOID:
			return TARGET_BOOL;
		case INT2OID:
			return TARGET_INT2;
		case INT4OID:
			return TARGET_INT4;
		case INT8OID:
			return TARGET_INT8;
		case FLOAT4OID:
			return TARGET_FLOAT4;
		case FLOAT8OID:
			return TARGET_FLOAT8;
		case NUMERICOID:
			return TARGET_NUMERIC;
		case TEXTOID:
			return TARGET_TEXT;
		case VARCHAROID:
			return typmod < 0 ? TARGET_TEXT : TARGET_OTHER;
		case BYTEAOID:
			return TARGET_BYTEA;
		case UUIDOID:
			return TARGET_UUID;
		case DATEOID:
			return TARGET_DATE;
		case TIMESTAMPOID:
			return TARGET_TIMESTAMP;
		case TIMESTAMPTZOID:
			return TARGET_TIMESTAMPTZ;
		case TIMEOID:
			return TARGET_TIME;
		default:
			return TARGET_OTHER;
	}
}

static bool
src_is_int(ArrowSource src)
{
	return src >= SRC_INT8 && src <= SRC_UINT64;
}

static bool
src_is_utf8(ArrowSource src)
{
	return src == SRC_UTF8 || src == SRC_LARGE_UTF8;
}

/*
 * choose_conv
 *		The conversion from an Arrow layout to a column's type, or CONV_NONE.
 *
 * Integers only widen (an int64 field does not go to an int4 column even if
 * its values would fit), so a schema either fits or not, whatever the data.
 * Strings go to text, and through the input function to any type whose
 * values have no Arrow type of their own (json, jsonb, uuid, inet, enums,
 * bpchar, varchar(n), arrays...).
 */
static ArrowConv
choose_conv(ArrowTarget target, ArrowSource src, const ArrowColumn *col)
{
	if (src == SRC_NULL)
		return CONV_NULL;
	switch (target)
	{
		case TARGET_BOOL:
			return src == SRC_BOOL ? CONV_BOOL : CONV_NONE;
		case TARGET_INT2:
			return (src == SRC_INT8 || src == SRC_INT16 || src == SRC_UINT8) ?
				CONV_INT : CONV_NONE;
		case TARGET_INT4:
			return (src == SRC_INT8 || src == SRC_INT16 || src == SRC_INT32 ||
					src == SRC_UINT8 || src == SRC_UINT16) ? CONV_INT : CONV_NONE;
		case TARGET_INT8:
			return (src_is_int(src) && src != SRC_UINT64) ? CONV_INT : CONV_NONE;
		case TARGET_FLOAT4:
			if (src == SRC_FLOAT32)
				return CONV_FLOAT;
			return (src == SRC_INT8 || src == SRC_INT16 || src == SRC_UINT8 ||
					src == SRC_UINT16) ? CONV_INT_FLOAT : CONV_NONE;
		case TARGET_FLOAT8:
			if (src == SRC_FLOAT32 || src == SRC_FLOAT64)
				return CONV_FLOAT;
			return src_is_int(src) ? CONV_INT_FLOAT : CONV_NONE;
		case TARGET_NUMERIC:
			if (src_is_int(src))
				return CONV_INT_NUMERIC;
			if (src == SRC_FLOAT32 || src == SRC_FLOAT64)
				return CONV_FLOAT_NUMERIC;
			if (src_is_utf8(src))
				return CONV_STR_INPUT;	/* exact decimal text, any scale per row */
			return src == SRC_DECIMAL ? CONV_DECIMAL : CONV_NONE;
		case TARGET_TEXT:
			return src_is_utf8(src) ? CONV_TEXT : CONV_NONE;
		case TARGET_BYTEA:
			if (src == SRC_BINARY || src == SRC_LARGE_BINARY)
				return CONV_BYTEA;
			return src == SRC_FIXED_BINARY ? CONV_FIXED_BYTEA : CONV_NONE;
		case TARGET_UUID:
			if (src == SRC_FIXED_BINARY && col->width == UUID_LEN)
				return CONV_UUID;
			return src_is_utf8(src) ? CONV_STR_INPUT : CONV_NONE;
		case TARGET_DATE:
			return (src == SRC_DATE32 || src == SRC_DATE64) ? CONV_DATE : CONV_NONE;
		case TARGET_TIMESTAMP:
		case TARGET_TIMESTAMPTZ:
			return src == SRC_TIMESTAMP ? CONV_TIMESTAMP : CONV_NONE;
		case TARGET_TIME:
			return (src == SRC_TIME32 || src == SRC_TIME64) ? CONV_TIME : CONV_NONE;
		case TARGET_OTHER:
			return src_is_utf8(src) ? CONV_STR_INPUT : CONV_NONE;
	}
	return CONV_NONE;
}

/*
 * schema_matches
 *		Is this the schema we resolved last?  Compares formats and names of
 *		the top-level fields: a few strcmp per batch.
 */
static bool
schema_matches(ArrowScan *scan, const struct ArrowSchema *schema)
{
	if (!scan->resolved || schema->n_children != scan->nfields ||
		schema->format == NULL || strcmp(schema->format, "+s") != 0)
		return false;
	for (int i = 0; i < scan->nfields; i++)
	{
		const struct ArrowSchema *child = schema->children[i];

		if (child == NULL || child->format == NULL ||
			strcmp(child->format, scan->field_formats[i]) != 0 ||
			strcmp(child->name ? child->name : "", scan->field_names[i]) != 0)
			return false;
		if ((child->dictionary == NULL) != (scan->field_dict_formats[i] == NULL))
			return false;
		if (child->dictionary != NULL &&
			(child->dictionary->format == NULL ||
			 strcmp(child->dictionary->format, scan->field_dict_formats[i]) != 0))
			return false;
	}
	return true;
}

/*
 * field_list
 *		The names of the fields, for the detail of a missing-column error.
 */
static char *
field_list(const struct ArrowSchema *schema)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < schema->n_children; i++)
	{
		const struct ArrowSchema *child = schema->children[i];

		if (i > 0)
			appendStringInfoString(&buf, ", ");
		if (i >= 20)
		{
			appendStringInfo(&buf, "and %lld more", (long long) (schema->n_children - i));
			break;
		}
		appendStringInfo(&buf, "\"%s\"", child && child->name ? child->name : "");
	}
	return buf.data;
}

/*
 * resolve_schema
 *		Match projected columns to Arrow fields and choose conversions.
 *
 * Fields are matched by exact name, then by a case-insensitive match when
 * that is unambiguous (PostgreSQL folds unquoted names to lower case, Arrow
 * producers often do not).  Fields that no projected column reads are never
 * looked at, whatever their type.
 */
static void
resolve_schema(ArrowScan *scan, const struct ArrowSchema *schema)
{
	MemoryContext old;

	if (schema_matches(scan, schema))
		return;

	if (schema->format == NULL || strcmp(schema->format, "+s") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("Arrow data of type %s cannot be read as rows",
						arrow_type_name(schema)),
				 errhint("Return record batches (a struct array whose fields are the columns), a table or a record batch reader.")));
	if (schema->n_children > 0 && schema->children == NULL)
		elog(ERROR, "Arrow schema has %lld fields but no children",
			 (long long) schema->n_children);

	MemoryContextReset(scan->schema_cxt);
	scan->resolved = false;
	old = MemoryContextSwitchTo(scan->schema_cxt);

	for (int c = 0; c < scan->ncols; c++)
	{
		ArrowColumn *col = &scan->cols[c];
		const struct ArrowSchema *field = NULL;
		const struct ArrowSchema *values;
		int			found = -1;
		int			nfolded = 0;

		for (int i = 0; i < schema->n_children; i++)
		{
			const struct ArrowSchema *child = schema->children[i];

			if (child == NULL || child->name == NULL)
				continue;
			if (strcmp(child->name, col->attname) == 0)
			{
				found = i;
				nfolded = 1;
				break;
			}
			if (pg_strcasecmp(child->name, col->attname) == 0)
			{
				if (nfolded++ == 0)
					found = i;
			}
		}
		if (nfolded > 1)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_COLUMN_NAME_NOT_FOUND),
					 errmsg("column \"%s\" matches several Arrow fields that differ only in case",
							col->attname),
					 errdetail("The Arrow data has the fields %s.", field_list(schema)),
					 errhint("Rename the fields in the wrapper, or name the column exactly like one of them (quoted).")));
		if (found < 0)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_COLUMN_NAME_NOT_FOUND),
					 errmsg("column \"%s\" is missing from the Arrow data", col->attname),
					 errdetail("The Arrow data has the fields %s.", field_list(schema)),
					 errhint("Return a field named \"%s\" from the wrapper, or leave the column out of the query.",
							 col->attname)));
		field = schema->children[found];
		col->field = found;
		if (field->format == NULL)
			elog(ERROR, "Arrow field \"%s\" has no format", col->attname);

		/* the layout of the values, and of the indices of a dictionary */
		col->width = col->dec_scale = col->dec_bits = 0;
		col->has_tz = false;
		col->index_src = SRC_UNSUPPORTED;
		values = field;
		if (field->dictionary != NULL)
		{
			ArrowColumn dummy;

			col->index_src = parse_format(field->format, &dummy);
			values = field->dictionary;
		}
		col->src = parse_format(values->format, col);
		col->conv = choose_conv(col->target, col->src, col);
		if (field->dictionary != NULL && !src_is_int(col->index_src))
			col->conv = CONV_NONE;
		if (col->conv == CONV_NONE)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
					 errmsg("column \"%s\" has Arrow type %s, which cannot be converted to %s",
							col->attname, arrow_type_name(field),
							format_type_be(col->typid)),
					 errdetail("The Arrow format string of the field is \"%s\"%s.",
							   field->format,
							   field->dictionary ? " (a dictionary)" : ""),
					 errhint("Change the column's type in the foreign table, or cast the field in the wrapper.")));

		if (col->conv == CONV_STR_INPUT && !col->inflinfo_ready)
		{
			Oid			typinput;

			getTypeInputInfo(col->typid, &typinput, &col->typioparam);
			fmgr_info_cxt(typinput, &col->inflinfo, scan->mcxt);
			col->inflinfo_ready = true;
		}
	}

	/* the signature that later batches are compared with */
	scan->nfields = (int) schema->n_children;
	scan->field_formats = palloc(sizeof(char *) * Max(scan->nfields, 1));
	scan->field_names = palloc(sizeof(char *) * Max(scan->nfields, 1));
	scan->field_dict_formats = palloc(sizeof(char *) * Max(scan->nfields, 1));
	for (int i = 0; i < scan->nfields; i++)
	{
		const struct ArrowSchema *child = schema->children[i];

		scan->field_formats[i] = pstrdup(child && child->format ? child->format : "");
		scan->field_names[i] = pstrdup(child && child->name ? child->name : "");
		scan->field_dict_formats[i] =
			(child && child->dictionary && child->dictionary->format) ?
			pstrdup(child->dictionary->format) : NULL;
	}
	scan->resolved = true;
	MemoryContextSwitchTo(old);
}

/* ---------------------------------------------------------------------
 * Batches
 * ---------------------------------------------------------------------
 */

static void
malformed(ArrowColumn *col, const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
			 errmsg("malformed Arrow data in column \"%s\": %s",
					col ? col->attname : "?", what)));
}

static int
buffers_needed(ArrowSource src)
{
	switch (src)
	{
		case SRC_NULL:
			return 0;
		case SRC_UTF8:
		case SRC_LARGE_UTF8:
		case SRC_BINARY:
		case SRC_LARGE_BINARY:
			return 3;
		default:
			return 2;
	}
}

/* The offset of value k in a string/binary array. */
static inline int64
var_offset(const struct ArrowArray *arr, bool large, int64 k)
{
	return large ? ((const int64 *) arr->buffers[1])[k]
		: (int64) ((const int32 *) arr->buffers[1])[k];
}

static inline bool
src_is_large(ArrowSource src)
{
	return src == SRC_LARGE_UTF8 || src == SRC_LARGE_BINARY;
}

/*
 * check_array
 *		Cheap structural checks of one array before we index into it.
 */
static void
check_array(ArrowColumn *col, const struct ArrowArray *arr, ArrowSource src,
			int64 needed_len)
{
	int			nbuf = buffers_needed(src);

	if (arr == NULL)
		malformed(col, "missing array");
	if (arr->length < needed_len || arr->offset < 0)
		malformed(col, "array shorter than the batch");
	if (arr->n_buffers < nbuf)
		malformed(col, "too few buffers");
	if (arr->length > 0)
	{
		for (int b = 1; b < nbuf; b++)
		{
			/* the data buffer of strings may be absent if all are empty */
			if (arr->buffers[b] == NULL && !(nbuf == 3 && b == 2))
				malformed(col, "missing buffer");
		}
	}
}

/*
 * bind_batch
 *		Point every projected column at its array in the current batch.
 */
static void
bind_batch(ArrowScan *scan)
{
	struct ArrowArray *batch = &scan->batch;
	ErrorContextCallback errcallback;

	scan->batch_pos = 0;
	scan->batch_len = 0;
	scan->chunk_pos = scan->chunk_len = 0;
	if (batch->length <= 0)
		return;
	if (batch->offset < 0)
		malformed(NULL, "negative offset");
	if (batch->n_children != scan->nfields ||
		(batch->n_children > 0 && batch->children == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_DATA_TYPE),
				 errmsg("Arrow record batch has %lld columns but its schema has %d",
						(long long) batch->n_children, scan->nfields)));
	scan->row_validity = (batch->null_count != 0 && batch->n_buffers > 0) ?
		batch->buffers[0] : NULL;

	errcallback.callback = arrow_error_callback;
	errcallback.arg = scan;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;
	for (int c = 0; c < scan->ncols; c++)
	{
		ArrowColumn *col = &scan->cols[c];
		const struct ArrowArray *arr = batch->children[col->field];
		ArrowSource layout = col->index_src != SRC_UNSUPPORTED ? col->index_src : col->src;

		scan->cur_col = col;
		if (arr == NULL)
			malformed(col, "missing child array");
		check_array(col, arr, layout, batch->offset + batch->length);
		col->arr = arr;
		col->base = arr->offset + batch->offset;
		col->validity = (arr->null_count != 0 && arr->n_buffers > 0) ?
			arr->buffers[0] : NULL;
		col->vardata = NULL;
		if (buffers_needed(layout) == 3)
		{
			int64		lo = var_offset(arr, src_is_large(layout), col->base);
			int64		hi = var_offset(arr, src_is_large(layout), col->base + batch->length);

			if (lo < 0 || hi < lo)
				malformed(col, "offsets out of order");
			col->vardata = arr->buffers[2];
			if (col->vardata == NULL)
			{
				if (hi != lo)
					malformed(col, "missing data buffer");
				col->vardata = "";
			}
		}
		if (col->index_src != SRC_UNSUPPORTED)
			convert_dictionary(scan, col);
	}
	scan->cur_col = NULL;
	error_context_stack = errcallback.previous;
	scan->batch_len = batch->length;
}

/*
 * fetch_batch
 *		Release the current batch and get the next non-empty one.
 */
static bool
fetch_batch(ArrowScan *scan)
{
	for (;;)
	{
		release_batch(scan);
		MemoryContextReset(scan->batch_cxt);
		CHECK_FOR_INTERRUPTS();
		if (scan->done)
			return false;

		if (scan->is_stream)
		{
			int			rc;

			pyhost_enter();
			rc = scan->stream.get_next(&scan->stream, &scan->batch);
			pyhost_leave();
			if (rc != 0)
			{
				scan->batch.release = NULL; /* not ours: get_next failed */
				if (PyErr_Occurred())
					pyhost_report_error("reading the Arrow stream");
				CHECK_FOR_INTERRUPTS();
				report_stream_error(scan, rc, "could not read the next Arrow record batch");
			}
			if (scan->batch.release == NULL)
			{
				/* end of stream */
				arrow_scan_release(scan);
				return false;
			}
		}
		else
		{
			PyObject   *item;

			if (scan->iter == NULL)
			{
				scan->done = true;
				return false;
			}
			pyhost_enter();
			item = PyIter_Next(scan->iter);
			pyhost_leave();
			if (item == NULL)
			{
				if (PyErr_Occurred())
					pyhost_report_error("execute (iterating over Arrow batches)");
				arrow_scan_release(scan);
				return false;
			}
			PG_TRY();
			{
				take_batch(scan, item);
			}
			PG_FINALLY();
			{
				Py_DECREF(item);
			}
			PG_END_TRY();
			resolve_schema(scan, &scan->schema);
			release_schema(scan);
		}
		bind_batch(scan);
		if (scan->batch_len > 0)
			return true;
	}
}

/* ---------------------------------------------------------------------
 * Conversion
 * ---------------------------------------------------------------------
 */

static void
arrow_error_callback(void *arg)
{
	ArrowScan  *scan = (ArrowScan *) arg;

	if (scan->cur_col != NULL)
		errcontext("Arrow column \"%s\"", scan->cur_col->attname);
}

/*
 * arena_bound
 *		Bytes the bump buffer must offer to convert n values of a column.
 *
 * A string takes its length plus a varlena header, plus up to 3 bytes of
 * alignment when the header is the 4-byte kind.
 */
static Size
arena_bound(ArrowScan *scan, ArrowColumn *col, const struct ArrowArray *arr,
			int64 first, int64 n)
{
	switch (col->conv)
	{
		case CONV_TEXT:
			if (!scan->server_utf8)
				return 0;
			/* FALLTHROUGH */
		case CONV_BYTEA:
			{
				bool		large = src_is_large(col->src);
				int64		bytes = var_offset(arr, large, first + n) - var_offset(arr, large, first);

				if (bytes < 0)
					malformed(col, "offsets out of order");
				return (Size) bytes + (Size) n * (VARHDRSZ + 3);
			}
		case CONV_FIXED_BYTEA:
			return (Size) n * (col->width + VARHDRSZ + 3);
		case CONV_UUID:
			return (Size) n * UUID_LEN;
		default:
			return 0;
	}
}

/* A varlena of `len` bytes at *bump, with a 1-byte header when it fits. */
static inline Datum
bump_varlena(char **bump, const char *src, int64 len)
{
	char	   *p = *bump;

	if (len <= VARATT_SHORT_MAX - VARHDRSZ_SHORT)
	{
		SET_VARSIZE_SHORT(p, len + VARHDRSZ_SHORT);
		memcpy(p + VARHDRSZ_SHORT, src, len);
		*bump = p + VARHDRSZ_SHORT + len;
	}
	else
	{
		p = (char *) TYPEALIGN(ALIGNOF_INT, p);
		SET_VARSIZE(p, len + VARHDRSZ);
		memcpy(VARDATA(p), src, len);
		*bump = p + VARHDRSZ + len;
	}
	return PointerGetDatum(p);
}

/*
 * utf8_to_cstring
 *		A NUL-terminated copy of a UTF-8 string in the server encoding.
 *
 * Rejects invalid UTF-8 and NUL bytes, like any text input.
 */
static char *
utf8_to_cstring(ArrowScan *scan, const char *s, int64 len)
{
	char	   *conv;
	char	   *res;

	if (len > MaxAllocSize - VARHDRSZ - 1)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("Arrow string of %lld bytes is too long", (long long) len)));
	if (scan->server_utf8)
	{
		(void) pg_verifymbstr(s, (int) len, false);
		res = palloc(len + 1);
		memcpy(res, s, len);
		res[len] = '\0';
		return res;
	}
	conv = pg_any_to_server(s, (int) len, PG_UTF8);
	if (conv != s)
		return conv;
	res = palloc(len + 1);
	memcpy(res, s, len);
	res[len] = '\0';
	return res;
}

/*
 * check_utf8_chunk
 *		Verify the strings of a chunk in one pass over their bytes.
 *
 * The strings of a chunk are contiguous, so one verification of the whole
 * range is enough if every non-empty string also starts on a character
 * boundary (a byte that is not a UTF-8 continuation byte).  If that fails we
 * check string by string, which reports the culprit, and skips the bytes of
 * NULL slots (which the format allows to hold anything).
 */
static void
check_utf8_chunk(ArrowColumn *col, const struct ArrowArray *arr, int64 first, int64 n,
				 const bool *nulls, int stride)
{
	bool		large = src_is_large(col->src);
	const char *data = col->vardata;
	int64		lo = var_offset(arr, large, first);
	int64		hi = var_offset(arr, large, first + n);
	bool		ok;

	ok = (hi - lo <= INT_MAX) && pg_verifymbstr(data + lo, (int) (hi - lo), true);
	for (int64 i = 0; ok && i < n; i++)
	{
		int64		start = var_offset(arr, large, first + i);

		if (!nulls[i * stride] && var_offset(arr, large, first + i + 1) > start &&
			(((unsigned char) data[start]) & 0xC0) == 0x80)
			ok = false;
	}
	if (ok)
		return;
	for (int64 i = 0; i < n; i++)
	{
		int64		start = var_offset(arr, large, first + i);
		int64		len = var_offset(arr, large, first + i + 1) - start;

		if (nulls[i * stride])
			continue;
		if (len < 0 || len > INT_MAX)
			malformed(col, "string offsets out of order");
		(void) pg_verifymbstr(data + start, (int) len, false);
	}
}

/* Loop over the valid (non-NULL) slots of a chunk. */
#define FOR_EACH_VALID(i) \
	for (int64 i = 0; i < n; i++) \
		if (!nulls[(i) * stride])

/*
 * One loop per integer width: `v` is the value as int64, EXPR its Datum.
 * uint64 is not here; the conversions that accept it handle it apart.
 */
#define INT_SOURCE_LOOPS(EXPR) \
	switch (col->src) \
	{ \
		case SRC_INT8: INT_LOOP(int8, EXPR); break; \
		case SRC_INT16: INT_LOOP(int16, EXPR); break; \
		case SRC_INT32: INT_LOOP(int32, EXPR); break; \
		case SRC_INT64: INT_LOOP(int64, EXPR); break; \
		case SRC_UINT8: INT_LOOP(uint8, EXPR); break; \
		case SRC_UINT16: INT_LOOP(uint16, EXPR); break; \
		case SRC_UINT32: INT_LOOP(uint32, EXPR); break; \
		default: elog(ERROR, "unexpected Arrow integer layout %d", (int) col->src); \
	}
#define INT_LOOP(T, EXPR) \
	do { \
		const T    *src_ = (const T *) arr->buffers[1] + first; \
		FOR_EACH_VALID(i) \
		{ \
			int64		v = (int64) src_[i]; \
			values[i * stride] = (EXPR); \
		} \
	} while (0)

/*
 * Format a 128-bit two's complement integer (lo, hi) as a decimal with
 * `scale` digits after the point, into buf (at least 80 bytes).
 */
static void
format_decimal128(uint64 lo, int64 hi, int scale, char *buf)
{
	uint32		limbs[4];
	char		digits[48];
	int			ndigits = 0;
	bool		neg = hi < 0;
	char	   *p = buf;

	if (neg)
	{
		/* two's complement negation of the 128-bit value */
		lo = ~lo + 1;
		hi = (int64) ~((uint64) hi) + (lo == 0 ? 1 : 0);
	}
	limbs[0] = (uint32) ((uint64) hi >> 32);
	limbs[1] = (uint32) (uint64) hi;
	limbs[2] = (uint32) (lo >> 32);
	limbs[3] = (uint32) lo;

	/* repeated division by 10^9, least significant group first */
	for (;;)
	{
		uint64		rem = 0;
		bool		zero = true;

		for (int k = 0; k < 4; k++)
		{
			uint64		cur = (rem << 32) | limbs[k];

			limbs[k] = (uint32) (cur / 1000000000);
			rem = cur % 1000000000;
			if (limbs[k] != 0)
				zero = false;
		}
		for (int d = 0; d < 9; d++)
		{
			digits[ndigits++] = '0' + (char) (rem % 10);
			rem /= 10;
			if (zero && rem == 0)
				break;
		}
		if (zero)
			break;
	}
	while (ndigits > 1 && digits[ndigits - 1] == '0')
		ndigits--;

	if (neg)
		*p++ = '-';
	if (scale <= 0)
	{
		for (int d = ndigits - 1; d >= 0; d--)
			*p++ = digits[d];
		if (!(ndigits == 1 && digits[0] == '0'))
			for (int z = 0; z < -scale; z++)
				*p++ = '0';
	}
	else
	{
		int			intdigits = ndigits - scale;

		if (intdigits <= 0)
		{
			*p++ = '0';
			*p++ = '.';
			for (int z = 0; z < -intdigits; z++)
				*p++ = '0';
			for (int d = ndigits - 1; d >= 0; d--)
				*p++ = digits[d];
		}
		else
		{
			for (int d = ndigits - 1; d >= 0; d--)
			{
				*p++ = digits[d];
				if (d == scale)
					*p++ = '.';
			}
		}
	}
	*p = '\0';
}

static Datum
numeric_from_cstring(const char *s)
{
	return DirectFunctionCall3(numeric_in, CStringGetDatum(s),
							   ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
}

static void
timestamp_out_of_range(ArrowColumn *col)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
			 errmsg("timestamp out of range in column \"%s\"", col->attname)));
}

/* Arrow timestamp value -> PostgreSQL microseconds since 2000, or error. */
static inline Timestamp
arrow_to_timestamp(ArrowColumn *col, int64 v, ArrowUnit unit)
{
	int64		us;
	Timestamp	ts;

	switch (unit)
	{
		case UNIT_SECOND:
			if (pg_mul_s64_overflow(v, USECS_PER_SEC, &us))
				timestamp_out_of_range(col);
			break;
		case UNIT_MILLI:
			if (pg_mul_s64_overflow(v, 1000, &us))
				timestamp_out_of_range(col);
			break;
		case UNIT_MICRO:
			us = v;
			break;
		default:
			/* floor division: -1 ns is 1969-12-31 23:59:59.999999 */
			us = v / 1000;
			if (v % 1000 < 0)
				us--;
			break;
	}
	if (pg_sub_s64_overflow(us, EPOCH_DIFF_USECS, &ts) || !IS_VALID_TIMESTAMP(ts))
		timestamp_out_of_range(col);
	return ts;
}

/*
 * convert_values
 *		Convert n slots of an array, starting at absolute index `first` (the
 *		array's offset included), into values[i * stride].
 *
 * nulls[i * stride] says which slots are NULL; they are skipped.  Strings,
 * binaries and uuids are bump-allocated at *bump (arena_bound() bytes must
 * be available); other pass-by-reference values are palloc'd in the
 * current context.
 */
static void
convert_values(ArrowScan *scan, ArrowColumn *col, const struct ArrowArray *arr,
			   int64 first, int64 n, Datum *values, bool *nulls, int stride,
			   char **bump)
{
	switch (col->conv)
	{
		case CONV_NONE:
		case CONV_NULL:
			break;

		case CONV_BOOL:
			{
				const uint8 *bits = arr->buffers[1];

				FOR_EACH_VALID(i)
					values[i * stride] = BoolGetDatum(BIT_IS_SET(bits, first + i));
				break;
			}

		case CONV_INT:
			/* widening only: the int64 Datum is the int2/int4 Datum too */
			INT_SOURCE_LOOPS(Int64GetDatum(v));
			break;

		case CONV_INT_FLOAT:
			if (col->src == SRC_UINT64)
			{
				const uint64 *src = (const uint64 *) arr->buffers[1] + first;

				FOR_EACH_VALID(i)
					values[i * stride] = Float8GetDatum((float8) src[i]);
			}
			else if (col->target == TARGET_FLOAT4)
			{
				INT_SOURCE_LOOPS(Float4GetDatum((float4) v));
			}
			else
			{
				INT_SOURCE_LOOPS(Float8GetDatum((float8) v));
			}
			break;

		case CONV_INT_NUMERIC:
			if (col->src == SRC_UINT64)
			{
				const uint64 *src = (const uint64 *) arr->buffers[1] + first;

				FOR_EACH_VALID(i)
				{
					char		buf[32];

					if (src[i] <= (uint64) PG_INT64_MAX)
						values[i * stride] = NumericGetDatum(int64_to_numeric((int64) src[i]));
					else
					{
						snprintf(buf, sizeof(buf), UINT64_FORMAT, src[i]);
						values[i * stride] = numeric_from_cstring(buf);
					}
				}
			}
			else
			{
				INT_SOURCE_LOOPS(NumericGetDatum(int64_to_numeric(v)));
			}
			goto apply_numeric_typmod;

		case CONV_FLOAT:
			if (col->src == SRC_FLOAT32)
			{
				const float4 *src = (const float4 *) arr->buffers[1] + first;

				if (col->target == TARGET_FLOAT4)
				{
					FOR_EACH_VALID(i)
						values[i * stride] = Float4GetDatum(src[i]);
				}
				else
				{
					FOR_EACH_VALID(i)
						values[i * stride] = Float8GetDatum((float8) src[i]);
				}
			}
			else
			{
				const float8 *src = (const float8 *) arr->buffers[1] + first;

				FOR_EACH_VALID(i)
					values[i * stride] = Float8GetDatum(src[i]);
			}
			break;

		case CONV_FLOAT_NUMERIC:
			if (col->src == SRC_FLOAT32)
			{
				const float4 *src = (const float4 *) arr->buffers[1] + first;

				FOR_EACH_VALID(i)
					values[i * stride] = DirectFunctionCall1(float4_numeric,
															 Float4GetDatum(src[i]));
			}
			else
			{
				const float8 *src = (const float8 *) arr->buffers[1] + first;

				FOR_EACH_VALID(i)
					values[i * stride] = DirectFunctionCall1(float8_numeric,
															 Float8GetDatum(src[i]));
			}
			goto apply_numeric_typmod;

		case CONV_DECIMAL:
			{
				const char *data = arr->buffers[1];
				int			scale = col->dec_scale;

				if (col->dec_bits == 32)
				{
					FOR_EACH_VALID(i)
					{
						int32		v;

						memcpy(&v, data + (first + i) * 4, 4);
						values[i * stride] =
							NumericGetDatum(int64_div_fast_to_numeric(v, scale));
					}
				}
				else if (col->dec_bits == 64)
				{
					FOR_EACH_VALID(i)
					{
						int64		v;

						memcpy(&v, data + (first + i) * 8, 8);
						values[i * stride] =
							NumericGetDatum(int64_div_fast_to_numeric(v, scale));
					}
				}
				else
				{
					FOR_EACH_VALID(i)
					{
						uint64		lo;
						int64		hi;

						/* little-endian: low 64 bits first */
						memcpy(&lo, data + (first + i) * 16, 8);
						memcpy(&hi, data + (first + i) * 16 + 8, 8);
						if ((hi == 0 && lo <= (uint64) PG_INT64_MAX) ||
							(hi == -1 && lo > (uint64) PG_INT64_MAX))
							values[i * stride] =
								NumericGetDatum(int64_div_fast_to_numeric((int64) lo, scale));
						else
						{
							char		buf[96];

							format_decimal128(lo, hi, scale, buf);
							values[i * stride] = numeric_from_cstring(buf);
						}
					}
				}
			}
			goto apply_numeric_typmod;

		case CONV_TEXT:
			{
				bool		large = src_is_large(col->src);
				const char *data = col->vardata;

				if (!scan->server_utf8)
				{
					FOR_EACH_VALID(i)
					{
						int64		start = var_offset(arr, large, first + i);
						int64		len = var_offset(arr, large, first + i + 1) - start;

						values[i * stride] =
							CStringGetTextDatum(utf8_to_cstring(scan, data + start, len));
					}
					break;
				}
				check_utf8_chunk(col, arr, first, n, nulls, stride);
				if (large)
				{
					const int64 *off = (const int64 *) arr->buffers[1] + first;

					FOR_EACH_VALID(i)
					{
						if (unlikely(off[i + 1] < off[i]))
							malformed(col, "string offsets out of order");
						values[i * stride] = bump_varlena(bump, data + off[i], off[i + 1] - off[i]);
					}
				}
				else
				{
					const int32 *off = (const int32 *) arr->buffers[1] + first;

					FOR_EACH_VALID(i)
					{
						if (unlikely(off[i + 1] < off[i]))
							malformed(col, "string offsets out of order");
						values[i * stride] = bump_varlena(bump, data + off[i], off[i + 1] - off[i]);
					}
				}
				break;
			}

		case CONV_BYTEA:
			{
				bool		large = src_is_large(col->src);
				const char *data = col->vardata;

				FOR_EACH_VALID(i)
				{
					int64		start = var_offset(arr, large, first + i);
					int64		len = var_offset(arr, large, first + i + 1) - start;

					if (len < 0 || len > MaxAllocSize - VARHDRSZ)
						malformed(col, "binary offsets out of order");
					values[i * stride] = bump_varlena(bump, data + start, len);
				}
				break;
			}

		case CONV_STR_INPUT:
			{
				bool		large = src_is_large(col->src);
				const char *data = col->vardata;

				FOR_EACH_VALID(i)
				{
					int64		start = var_offset(arr, large, first + i);
					int64		len = var_offset(arr, large, first + i + 1) - start;

					if (len < 0)
						malformed(col, "string offsets out of order");
					values[i * stride] =
						InputFunctionCall(&col->inflinfo,
										  utf8_to_cstring(scan, data + start, len),
										  col->typioparam, col->typmod);
				}
				break;
			}

		case CONV_FIXED_BYTEA:
			{
				const char *data = arr->buffers[1];
				int			width = col->width;

				FOR_EACH_VALID(i)
					values[i * stride] = bump_varlena(bump, data + (first + i) * width, width);
				break;
			}

		case CONV_UUID:
			{
				const char *data = (const char *) arr->buffers[1] + first * UUID_LEN;
				char	   *p = *bump;

				FOR_EACH_VALID(i)
				{
					memcpy(p, data + i * UUID_LEN, UUID_LEN);
					values[i * stride] = PointerGetDatum(p);
					p += UUID_LEN;
				}
				*bump = p;
				break;
			}

		case CONV_DATE:
			{
				int64		days;

				if (col->src == SRC_DATE32)
				{
					const int32 *src = (const int32 *) arr->buffers[1] + first;

					FOR_EACH_VALID(i)
					{
						days = (int64) src[i] - EPOCH_DIFF_DAYS;
						if (!IS_VALID_DATE(days))
							ereport(ERROR,
									(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
									 errmsg("date out of range in column \"%s\"", col->attname)));
						values[i * stride] = DateADTGetDatum((DateADT) days);
					}
				}
				else
				{
					const int64 *src = (const int64 *) arr->buffers[1] + first;

					FOR_EACH_VALID(i)
					{
						int64		ms = src[i];

						days = ms / (SECS_PER_DAY * 1000);
						if (ms % (SECS_PER_DAY * 1000) < 0)
							days--;
						days -= EPOCH_DIFF_DAYS;
						if (!IS_VALID_DATE(days))
							ereport(ERROR,
									(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
									 errmsg("date out of range in column \"%s\"", col->attname)));
						values[i * stride] = DateADTGetDatum((DateADT) days);
					}
				}
				break;
			}

		case CONV_TIME:
			FOR_EACH_VALID(i)
			{
				int64		v;
				TimeADT		t;

				if (col->src == SRC_TIME32)
					v = ((const int32 *) arr->buffers[1])[first + i];
				else
					v = ((const int64 *) arr->buffers[1])[first + i];
				switch (col->unit)
				{
					case UNIT_SECOND:
						t = v * USECS_PER_SEC;
						break;
					case UNIT_MILLI:
						t = v * 1000;
						break;
					case UNIT_MICRO:
						t = v;
						break;
					default:
						t = v / 1000;
						break;
				}
				if (v < 0 || t > USECS_PER_DAY)
					ereport(ERROR,
							(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
							 errmsg("time out of range in column \"%s\"", col->attname)));
				values[i * stride] = TimeADTGetDatum(t);
			}
			break;

		case CONV_TIMESTAMP:
			{
				const int64 *src = (const int64 *) arr->buffers[1] + first;

				/*
				 * A time zone in the Arrow type means UTC instants: the same
				 * value for timestamptz, the UTC wall clock for timestamp.  A
				 * naive Arrow timestamp is a wall clock: timestamptz reads it
				 * in the session's time zone, as a cast would.
				 */
				if (col->target == TARGET_TIMESTAMPTZ && !col->has_tz)
				{
					FOR_EACH_VALID(i)
					{
						int			overflow = 0;
						Timestamp	ts = arrow_to_timestamp(col, src[i], col->unit);
						TimestampTz tstz = timestamp2timestamptz_opt_overflow(ts, &overflow);

						if (overflow != 0)
							timestamp_out_of_range(col);
						values[i * stride] = TimestampTzGetDatum(tstz);
					}
					break;
				}
				/* one loop per unit, so that the unit is not a per-row branch */
				switch (col->unit)
				{
					case UNIT_SECOND:
						FOR_EACH_VALID(i)
							values[i * stride] =
							TimestampGetDatum(arrow_to_timestamp(col, src[i], UNIT_SECOND));
						break;
					case UNIT_MILLI:
						FOR_EACH_VALID(i)
							values[i * stride] =
							TimestampGetDatum(arrow_to_timestamp(col, src[i], UNIT_MILLI));
						break;
					case UNIT_MICRO:
						FOR_EACH_VALID(i)
							values[i * stride] =
							TimestampGetDatum(arrow_to_timestamp(col, src[i], UNIT_MICRO));
						break;
					case UNIT_NANO:
						FOR_EACH_VALID(i)
							values[i * stride] =
							TimestampGetDatum(arrow_to_timestamp(col, src[i], UNIT_NANO));
						break;
				}
				break;
			}
	}
	return;

apply_numeric_typmod:
	/* numeric(p, s): round and check like an insert into a table would */
	if (col->typmod >= 0 && col->typid == NUMERICOID)
	{
		FOR_EACH_VALID(i)
			values[i * stride] = DirectFunctionCall2(numeric, values[i * stride],
													 Int32GetDatum(col->typmod));
	}
}

/*
 * fill_nulls
 *		NULL flags of n rows of a column, from its validity bitmap and the
 *		struct's own validity (a NULL struct slot is a row of NULLs).
 */
static void
fill_nulls(ArrowScan *scan, ArrowColumn *col, int64 first, int64 n, bool *nulls, int stride)
{
	const uint8 *validity = col->validity;
	const uint8 *rows = scan->row_validity;
	int64		row0 = scan->batch.offset + scan->batch_pos;

	if (col->conv == CONV_NULL)
	{
		for (int64 i = 0; i < n; i++)
			nulls[i * stride] = true;
		return;
	}
	if (validity == NULL)
	{
		for (int64 i = 0; i < n; i++)
			nulls[i * stride] = false;
	}
	else
	{
		for (int64 i = 0; i < n; i++)
			nulls[i * stride] = !BIT_IS_SET(validity, first + i);
	}
	if (rows != NULL)
	{
		for (int64 i = 0; i < n; i++)
			if (!BIT_IS_SET(rows, row0 + i))
				nulls[i * stride] = true;
	}
}

/*
 * convert_dictionary
 *		Convert the dictionary of an encoded column once for the batch.
 */
static void
convert_dictionary(ArrowScan *scan, ArrowColumn *col)
{
	const struct ArrowArray *dict = col->arr->dictionary;
	MemoryContext old;
	char	   *bump;
	Size		bound;
	const char *saved_vardata = col->vardata;
	const uint8 *saved_validity = col->validity;
	bool	   *nulls;

	if (dict == NULL)
		malformed(col, "dictionary-encoded array without a dictionary");
	check_array(col, dict, col->src, 0);

	old = MemoryContextSwitchTo(scan->batch_cxt);
	col->dict_len = dict->length;
	col->dict_values = palloc0(sizeof(Datum) * Max(dict->length, 1));
	col->dict_nulls = nulls = palloc(sizeof(bool) * Max(dict->length, 1));
	if (dict->length > 0)
	{
		/* the dictionary's own layout, for the converters */
		col->vardata = NULL;
		if (buffers_needed(col->src) == 3)
		{
			bool		large = src_is_large(col->src);

			if (var_offset(dict, large, dict->offset) < 0 ||
				var_offset(dict, large, dict->offset + dict->length) <
				var_offset(dict, large, dict->offset))
				malformed(col, "dictionary offsets out of order");
			col->vardata = dict->buffers[2] ? dict->buffers[2] : "";
		}
		col->validity = (dict->null_count != 0 && dict->n_buffers > 0) ?
			dict->buffers[0] : NULL;
		for (int64 i = 0; i < dict->length; i++)
			nulls[i] = col->conv == CONV_NULL ||
				(col->validity != NULL && !BIT_IS_SET(col->validity, dict->offset + i));
		bound = arena_bound(scan, col, dict, dict->offset, dict->length);
		bump = bound > 0 ? MemoryContextAllocHuge(scan->batch_cxt, bound) : NULL;
		convert_values(scan, col, dict, dict->offset, dict->length,
					   col->dict_values, nulls, 1, &bump);
	}
	col->vardata = saved_vardata;
	col->validity = saved_validity;
	MemoryContextSwitchTo(old);
}

/*
 * dict_lookup
 *		The values of n rows of an encoded column, by index.
 */
static void
dict_lookup(ArrowColumn *col, int64 first, int64 n, Datum *values, bool *nulls, int stride)
{
	const struct ArrowArray *arr = col->arr;
	const Datum *dv = col->dict_values;
	const bool *dn = col->dict_nulls;
	int64		dlen = col->dict_len;

#define DICT_LOOP(T) \
	do { \
		const T    *idx_ = (const T *) arr->buffers[1] + first; \
		FOR_EACH_VALID(i) \
		{ \
			int64		k = (int64) idx_[i]; \
			if (unlikely(k < 0 || k >= dlen)) \
				malformed(col, "dictionary index out of range"); \
			values[i * stride] = dv[k]; \
			nulls[i * stride] = dn[k]; \
		} \
	} while (0)

	switch (col->index_src)
	{
		case SRC_INT8:
			DICT_LOOP(int8);
			break;
		case SRC_INT16:
			DICT_LOOP(int16);
			break;
		case SRC_INT32:
			DICT_LOOP(int32);
			break;
		case SRC_INT64:
			DICT_LOOP(int64);
			break;
		case SRC_UINT8:
			DICT_LOOP(uint8);
			break;
		case SRC_UINT16:
			DICT_LOOP(uint16);
			break;
		case SRC_UINT32:
			DICT_LOOP(uint32);
			break;
		case SRC_UINT64:
			{
				const uint64 *idx = (const uint64 *) arr->buffers[1] + first;

				FOR_EACH_VALID(i)
				{
					if (idx[i] >= (uint64) dlen)
						malformed(col, "dictionary index out of range");
					values[i * stride] = dv[idx[i]];
					nulls[i * stride] = dn[idx[i]];
				}
				break;
			}
		default:
			elog(ERROR, "unexpected Arrow dictionary index layout %d", (int) col->index_src);
	}
#undef DICT_LOOP
}

/*
 * load_chunk
 *		Convert the next rows of the current batch (fetching batches as
 *		needed) into the chunk buffers.
 *
 * The chunk is shortened so that the bytes copied for strings stay under
 * ARROW_CHUNK_BYTES (a single row may exceed it).
 */
static bool
load_chunk(ArrowScan *scan)
{
	ErrorContextCallback errcallback;
	MemoryContext old;
	int64		n;
	Size		bytes;
	char	   *bump;
	int			natts = scan->natts;

	while (scan->batch_pos >= scan->batch_len)
	{
		if (!fetch_batch(scan))
			return false;
	}

	errcallback.callback = arrow_error_callback;
	errcallback.arg = scan;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	MemoryContextReset(scan->chunk_cxt);
	old = MemoryContextSwitchTo(scan->chunk_cxt);

	n = Min(scan->chunk_rows, scan->batch_len - scan->batch_pos);
	for (;;)
	{
		bytes = 0;
		for (int c = 0; c < scan->ncols; c++)
		{
			ArrowColumn *col = &scan->cols[c];

			scan->cur_col = col;
			if (col->index_src == SRC_UNSUPPORTED)
				bytes += arena_bound(scan, col, col->arr, col->base + scan->batch_pos, n);
		}
		if (bytes <= ARROW_CHUNK_BYTES || n == 1)
			break;
		n = Max(n / 2, 1);
	}
	if (bytes > scan->arena_size)
	{
		if (scan->arena)
			pfree(scan->arena);
		scan->arena = NULL;
		scan->arena_size = Max(bytes, 64 * 1024);
		scan->arena = MemoryContextAllocHuge(scan->mcxt, scan->arena_size);
	}
	bump = scan->arena;

	for (int c = 0; c < scan->ncols; c++)
	{
		ArrowColumn *col = &scan->cols[c];
		int64		first = col->base + scan->batch_pos;
		Datum	   *values = scan->values + col->attno;
		bool	   *nulls = scan->nulls + col->attno;

		scan->cur_col = col;
		fill_nulls(scan, col, first, n, nulls, natts);
		if (col->index_src != SRC_UNSUPPORTED)
			dict_lookup(col, first, n, values, nulls, natts);
		else
			convert_values(scan, col, col->arr, first, n, values, nulls, natts, &bump);
	}
	Assert(bump <= scan->arena + scan->arena_size || bytes == 0);

	MemoryContextSwitchTo(old);
	scan->cur_col = NULL;
	error_context_stack = errcallback.previous;

	scan->batch_pos += n;
	scan->chunk_pos = 0;
	scan->chunk_len = (int) n;
	CHECK_FOR_INTERRUPTS();
	return true;
}

/*
 * arrow_scan_next
 *		The next row, from the current chunk.
 */
bool
arrow_scan_next(ArrowScan *scan, TupleTableSlot *slot)
{
	int			natts = scan->natts;
	int			r;

	if (scan->chunk_pos >= scan->chunk_len)
	{
		if (scan->done || !load_chunk(scan))
			return false;
	}
	Assert(slot->tts_tupleDescriptor->natts == natts);
	ExecClearTuple(slot);		/* a no-op when the caller cleared it */
	r = scan->chunk_pos++;
	memcpy(slot->tts_values, scan->values + (Size) r * natts, sizeof(Datum) * natts);
	memcpy(slot->tts_isnull, scan->nulls + (Size) r * natts, sizeof(bool) * natts);
	ExecStoreVirtualTuple(slot);
	return true;
}
