-- Ingesting CloudEvents: exactly once per (source, id), validated first.
SET datestyle = 'ISO, YMD';
SET timezone = 'UTC';
SELECT regress.reset();
SET metering.now = '2024-01-01 12:00:00+00';

SELECT metering.ingest('{"specversion": "1.0", "id": "e1", "source": "api", "type": "request",
                         "subject": "acme", "time": "2024-01-01T10:00:00Z", "data": {"ms": 12}}');
-- the same (source, id) again is a duplicate: false, no error, not stored twice
SELECT metering.ingest('{"specversion": "1.0", "id": "e1", "source": "api", "type": "request",
                         "subject": "acme", "time": "2024-01-01T10:00:00Z", "data": {"ms": 99}}');
-- the same id from another source is another event
SELECT metering.ingest('{"specversion": "1.0", "id": "e1", "source": "worker", "type": "request",
                         "subject": "acme", "time": "2024-01-01T10:00:00Z"}');
-- time defaults to metering.now(), data to {}; null counts as absent
SELECT metering.ingest('{"specversion": "1.0", "id": "e2", "source": "api", "type": "request", "subject": "acme"}');
SELECT metering.ingest('{"specversion": "1.0", "id": "e3", "source": "api", "type": "request", "subject": "acme",
                         "time": null, "data": null}');
-- offsets are honoured; fractions beyond microseconds are rounded; extensions are ignored
SELECT metering.ingest('{"specversion": "1.0", "id": "e4", "source": "api", "type": "request", "subject": "acme",
                         "time": "2024-01-01T11:30:00.1234567+01:30", "traceparent": "00-abc", "data": {"ms": 1}}');
SELECT id, source, subject, type, time, data, ingested_at FROM metering.events ORDER BY source, id;

-- every malformed event is an error naming the field (22023), and nothing is stored
SELECT regress.err($$SELECT metering.ingest('[]')$$);
SELECT regress.err($$SELECT metering.ingest('"x"')$$);
SELECT regress.err($$SELECT metering.ingest(NULL)$$);
SELECT regress.err($$SELECT metering.ingest('{"id": "x", "source": "s", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "0.3", "id": "x", "source": "s", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": 1.0, "id": "x", "source": "s", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "source": "s", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "", "source": "s", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": 7, "source": "s", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "", "type": "t", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": ["t"], "subject": "u"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": null}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": "u", "time": 1704067200}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": "u", "time": "yesterday"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": "u", "time": "2024-01-01 10:00:00"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": "u", "time": "2024-02-30T10:00:00Z"}')$$);
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": "u", "data": [1]}')$$);
-- id, subject and type up to 512 bytes, source up to 1,024: at the limit stored, past it refused
SELECT metering.ingest(jsonb_build_object('specversion', '1.0', 'id', repeat('i', 512), 'source', repeat('s', 1024),
                                          'type', repeat('t', 512), 'subject', repeat('u', 512)));
SELECT regress.err(format('SELECT metering.ingest(%L)', jsonb_build_object('specversion', '1.0', 'id', repeat('é', 257), 'source', 's', 'type', 't', 'subject', 'u')));
SELECT regress.err(format('SELECT metering.ingest(%L)', jsonb_build_object('specversion', '1.0', 'id', 'x', 'source', repeat('s', 1025), 'type', 't', 'subject', 'u')));
SELECT regress.err(format('SELECT metering.ingest(%L)', jsonb_build_object('specversion', '1.0', 'id', 'x', 'source', 's', 'type', repeat('t', 513), 'subject', 'u')));
SELECT regress.err(format('SELECT * FROM metering.ingest_batch(%L)', jsonb_build_array(
  jsonb_build_object('specversion', '1.0', 'id', 'ok', 'source', 's', 'type', 't', 'subject', 'u'),
  jsonb_build_object('specversion', '1.0', 'id', 'x', 'source', 's', 'type', 't', 'subject', repeat('u', 513)))));
DELETE FROM metering.events WHERE length(id) = 512;
SELECT regress.err($$SELECT metering.ingest('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "subject": "u", "data": "text"}')$$);
SELECT count(*) AS still_stored FROM metering.events;

-- RFC 3339, strictly: accepted forms and their instants
SELECT v, metering._rfc3339(v) AT TIME ZONE 'UTC' AS utc
  FROM unnest(ARRAY['2024-01-01T00:00:00Z', '2024-01-01t00:00:00z', '2024-01-01 00:00:00Z',
                    '2024-01-01T00:00:00.5Z', '2024-01-01T00:00:00.0000005Z',
                    '2024-01-01T02:00:00+02:00', '2023-12-31T19:00:00-05:00',
                    '2024-02-29T23:59:59.999999Z', '2016-12-31T23:59:60Z']) v;
-- and refused ones
SELECT v, metering._rfc3339(v) AS parsed
  FROM unnest(ARRAY['2024-01-01', '2024-01-01T00:00:00', '2024-1-01T00:00:00Z', '2024-01-01T24:00:00Z',
                    '2023-02-29T00:00:00Z', '2024-01-01T00:00:00.Z', '2024-01-01T00:00:00+0200',
                    '2024-01-01T00:00:00+24:00', '2024-01-01T00:00:00Z ', ' 2024-01-01T00:00:00Z',
                    '0000-01-01T00:00:00Z', 'now', '']) v;

-- A batch is all or nothing: one malformed event rejects it, naming its index
SELECT regress.err($$SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('b1', 'acme', 'request', '2024-01-01T11:00:00Z'),
  regress.ev('b2', 'acme', 'request', '2024-01-01T11:00:00Z'),
  regress.ev('b3', 'acme', 'request', 'soon')))$$);
SELECT regress.err($$SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('b1', 'acme', 'request', '2024-01-01T11:00:00Z'),
  '{"specversion": "1.0", "id": "b2", "source": "test", "type": "request"}'::jsonb))$$);
SELECT regress.err($$SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('b1', 'acme', 'request', '2024-01-01T11:00:00Z'), 42))$$);
SELECT regress.err($$SELECT * FROM metering.ingest_batch('{"not": "an array"}')$$);
SELECT regress.err($$SELECT * FROM metering.ingest_batch(NULL)$$);
SELECT count(*) AS nothing_stored FROM metering.events WHERE id LIKE 'b%';

-- duplicates inside the batch and against stored events are counted
SELECT * FROM metering.ingest_batch(jsonb_build_array(
  regress.ev('b1', 'acme', 'request', '2024-01-01T11:00:00Z', '{"n": 1}'),
  regress.ev('b2', 'acme', 'request', '2024-01-01T11:01:00Z'),
  regress.ev('b1', 'acme', 'request', '2024-01-01T11:02:00Z', '{"n": 2}'),
  '{"specversion": "1.0", "id": "e1", "source": "api", "type": "request", "subject": "acme"}'::jsonb));
-- within a batch the first of a repeated (source, id) wins
SELECT id, time, data FROM metering.events WHERE id = 'b1';
SELECT * FROM metering.ingest_batch('[]');

-- a plain INSERT is as good as ingest, and the table keeps the same rules
INSERT INTO metering.events (id, source, subject, type, time, data)
VALUES ('p1', 'sql', 'acme', 'request', '2024-01-01T09:00:00Z', '{"ms": 3}');
SELECT regress.err($$INSERT INTO metering.events (id, source, subject, type, data) VALUES ('p2', 'sql', 'acme', 'request', '[1]')$$);
SELECT regress.err($$INSERT INTO metering.events (id, source, subject, type) VALUES ('p2', 'sql', '', 'request')$$);
SELECT regress.err($$INSERT INTO metering.events (id, source, subject, type) VALUES ('p1', 'sql', 'acme', 'request')$$);
SELECT regress.err($$INSERT INTO metering.events (id, source, subject, type, time) VALUES ('p3', 'sql', 'acme', 'request', 'infinity')$$);
-- long values are quoted whole characters at a time
SELECT regress.err(format('SELECT metering.ingest(%L)', jsonb_build_object('specversion', 'v' || repeat('é', 40),
                          'id', 'x', 'source', 's', 'type', 't', 'subject', 'u')));

-- events are immutable
SELECT regress.err($$UPDATE metering.events SET data = '{"ms": 0}' WHERE id = 'p1'$$);
SELECT regress.err($$UPDATE metering.events SET subject = 'other' WHERE id = 'p1'$$);
SELECT count(*) FROM metering.events;
