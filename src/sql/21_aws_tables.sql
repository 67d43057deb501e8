-- AWS Marketplace Metering Service: products, customers and usage records.

CREATE TABLE metering.products (
  product_code text PRIMARY KEY CHECK (product_code <> ''),
  name         text,
  created_at   timestamptz NOT NULL DEFAULT metering.now()
);
COMMENT ON TABLE metering.products IS 'AWS Marketplace products (ProductCode)';
COMMENT ON COLUMN metering.products.product_code IS 'the AWS product code';
COMMENT ON COLUMN metering.products.name IS 'a readable name';
COMMENT ON COLUMN metering.products.created_at IS 'when the product was added';

CREATE TABLE metering.product_dimensions (
  product_code text NOT NULL REFERENCES metering.products ON DELETE CASCADE,
  dimension    text NOT NULL CHECK (dimension <> ''),
  description  text,
  PRIMARY KEY (product_code, dimension)
);
COMMENT ON TABLE metering.product_dimensions IS
  'the usage dimensions a product meters (UsageDimension); each becomes the type of its events';
COMMENT ON COLUMN metering.product_dimensions.product_code IS 'the product';
COMMENT ON COLUMN metering.product_dimensions.dimension IS 'the dimension name, also the event type of its records';
COMMENT ON COLUMN metering.product_dimensions.description IS 'free text';

-- A customer identifier is the subject of the customer's events: compared
-- byte by byte as subjects are (11_events.sql), and in a distributed install
-- the key its usage records are co-located with its events by.
CREATE TABLE metering.customers (
  customer_identifier           text COLLATE "C" PRIMARY KEY CHECK (customer_identifier <> ''),
  product_code                  text REFERENCES metering.products,
  customer_aws_account_id       text,
  subscribed_at                 timestamptz DEFAULT metering.now(),
  unsubscribed_at               timestamptz,
  registration_token            text UNIQUE,
  registration_token_expires_at timestamptz,
  registration_token_used_at    timestamptz,
  CONSTRAINT customers_subscription_order CHECK (unsubscribed_at > subscribed_at)
);
CREATE INDEX customers_product_account_idx ON metering.customers (product_code, customer_aws_account_id);
COMMENT ON TABLE metering.customers IS
  'AWS Marketplace customers; a customer is subscribed to product_code on [subscribed_at, unsubscribed_at)';
COMMENT ON COLUMN metering.customers.customer_identifier IS 'the AWS CustomerIdentifier, also the subject of the customer''s events';
COMMENT ON COLUMN metering.customers.product_code IS 'the product the customer subscribed to';
COMMENT ON COLUMN metering.customers.customer_aws_account_id IS 'the customer''s AWS account id';
COMMENT ON COLUMN metering.customers.subscribed_at IS 'start of the subscription; NULL means since always';
COMMENT ON COLUMN metering.customers.unsubscribed_at IS 'end of the subscription (exclusive); NULL while subscribed';
COMMENT ON COLUMN metering.customers.registration_token IS 'the one-time token metering.resolve_customer exchanges';
COMMENT ON COLUMN metering.customers.registration_token_expires_at IS 'when the token expires; NULL never';
COMMENT ON COLUMN metering.customers.registration_token_used_at IS 'when the token was resolved; a used token is expired';

CREATE TABLE metering.usage_records (
  metering_record_id  uuid PRIMARY KEY DEFAULT metering.uuid_v7(),
  customer_identifier text COLLATE "C" NOT NULL,
  product_code        text NOT NULL,
  dimension           text NOT NULL,
  usage_hour          timestamptz NOT NULL,
  quantity            bigint NOT NULL CHECK (quantity BETWEEN 0 AND 2147483647),
  allocations         jsonb,
  usage_timestamp     timestamptz NOT NULL,
  created_at          timestamptz NOT NULL DEFAULT metering.now(),
  UNIQUE (customer_identifier, product_code, dimension, usage_hour)
);
COMMENT ON TABLE metering.usage_records IS
  'accepted MeterUsage and BatchMeterUsage records, one per (customer, product, dimension, UTC hour), shared by both calls; each is also an event; immutable';
COMMENT ON COLUMN metering.usage_records.metering_record_id IS 'the MeteringRecordId';
COMMENT ON COLUMN metering.usage_records.customer_identifier IS 'the customer (event subject)';
COMMENT ON COLUMN metering.usage_records.product_code IS 'the product';
COMMENT ON COLUMN metering.usage_records.dimension IS 'the usage dimension (event type)';
COMMENT ON COLUMN metering.usage_records.usage_hour IS 'the usage timestamp rounded down to the UTC hour (event time)';
COMMENT ON COLUMN metering.usage_records.quantity IS 'the usage quantity';
COMMENT ON COLUMN metering.usage_records.allocations IS 'the UsageAllocations as sent, or NULL';
COMMENT ON COLUMN metering.usage_records.usage_timestamp IS 'the timestamp as sent';
COMMENT ON COLUMN metering.usage_records.created_at IS 'when the record was accepted';

CREATE FUNCTION metering._usage_records_immutable() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'usage records are immutable'
    USING ERRCODE = 'object_not_in_prerequisite_state',
          DETAIL = format('Metering record %s was accepted at %s.', OLD.metering_record_id, OLD.created_at);
END $$;
COMMENT ON FUNCTION metering._usage_records_immutable() IS 'internal: usage records are never updated or deleted';
CREATE TRIGGER usage_records_immutable BEFORE UPDATE OR DELETE ON metering.usage_records
  FOR EACH ROW EXECUTE FUNCTION metering._usage_records_immutable();

CREATE TABLE metering.registrations (
  product_code        text NOT NULL,
  customer_identifier text COLLATE "C" NOT NULL,
  nonce               text,
  public_key_version  integer NOT NULL,
  first_registered_at timestamptz NOT NULL DEFAULT metering.now(),
  last_registered_at  timestamptz NOT NULL DEFAULT metering.now(),
  calls               bigint NOT NULL DEFAULT 1,
  UNIQUE NULLS NOT DISTINCT (customer_identifier, product_code, nonce)
);
COMMENT ON TABLE metering.registrations IS
  'RegisterUsage calls, one row per (customer, product, nonce): the subscription is checked only at the first call of a nonce';
COMMENT ON COLUMN metering.registrations.product_code IS 'the product';
COMMENT ON COLUMN metering.registrations.customer_identifier IS 'the customer';
COMMENT ON COLUMN metering.registrations.nonce IS 'the caller''s nonce (a task or pod); NULL for calls without one';
COMMENT ON COLUMN metering.registrations.public_key_version IS 'the key version of the latest call';
COMMENT ON COLUMN metering.registrations.first_registered_at IS 'the first call';
COMMENT ON COLUMN metering.registrations.last_registered_at IS 'the latest call';
COMMENT ON COLUMN metering.registrations.calls IS 'how many calls';
