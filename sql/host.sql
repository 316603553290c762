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
