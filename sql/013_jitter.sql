-- 013: a delay's jitter, defined once for both replay paths. dlqd/policy.py
-- (jittered_micros) computes the same integers: the express page and decide()
-- agree to the microsecond. u: the first 8 bytes of sha256(id) as an unsigned
-- integer; ppm: the jitter in millionths; div() truncates toward zero.
CREATE FUNCTION dlqd_jittered_us(id uuid, delay_us bigint, jitter_ppm bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN jitter_ppm <= 0 OR delay_us = 0 THEN delay_us
           ELSE delay_us + div(delay_us::numeric * (2 * h.u - 18446744073709551616) * jitter_ppm,
                               18446744073709551616000000)::bigint END
      FROM (SELECT s::numeric + CASE WHEN s < 0 THEN 18446744073709551616 ELSE 0 END AS u
              FROM (SELECT ('x' || encode(substring(sha256(uuid_send(id)) FROM 1 FOR 8), 'hex'))
                               ::bit(64)::bigint AS s) b) h
$$;
