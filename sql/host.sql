-- The host: a foreign-data wrapper that runs Python wrapper classes written on the
-- Multicorn2 API.  A server names the class with OPTIONS (wrapper 'module.Class');
-- only a superuser may set that option (the validator enforces it).

CREATE FUNCTION otelspans_fdw_handler()
RETURNS fdw_handler
AS 'MODULE_PATHNAME'
LANGUAGE C STRICT;

CREATE FUNCTION otelspans_fdw_validator(text[], oid)
RETURNS void
AS 'MODULE_PATHNAME'
LANGUAGE C STRICT;

CREATE FOREIGN DATA WRAPPER otelspans_fdw
  HANDLER otelspans_fdw_handler
  VALIDATOR otelspans_fdw_validator;

-- Run a Python function (module.function) inside the backend with JSON arguments and
-- result.  Arbitrary code: superusers only; maintenance functions wrap it.
CREATE FUNCTION otelspans_call(function text, args jsonb DEFAULT '{}')
RETURNS jsonb
AS 'MODULE_PATHNAME'
LANGUAGE C;

REVOKE ALL ON FUNCTION otelspans_call(text, jsonb) FROM PUBLIC;
