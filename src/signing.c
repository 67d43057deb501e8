/*
 * signing.c: HMAC-SHA256 signatures and compact JWTs (RFC 7519, HS256).
 *
 * Built on PostgreSQL's own HMAC and base64 so the extension needs no other
 * library; the secrets live in metering.signing_keys.
 */
#include "postgres.h"

#include "common/base64.h"
#include "common/cryptohash.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include "metering.h"

static void
HmacSha256(const uint8 *key, size_t keylen, const uint8 *msg, size_t msglen,
		   uint8 *out)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);

	if (ctx == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while signing")));
	if (pg_hmac_init(ctx, key, keylen) < 0 ||
		pg_hmac_update(ctx, msg, msglen) < 0 ||
		pg_hmac_final(ctx, out, PG_SHA256_DIGEST_LENGTH) < 0)
	{
		const char *why = pg_hmac_error(ctx);

		pg_hmac_free(ctx);
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute HMAC-SHA256: %s", why)));
	}
	pg_hmac_free(ctx);
}

/* base64url without padding (RFC 4648 section 5), as JWTs use it. */
static void
AppendBase64Url(StringInfo buf, const char *data, int len)
{
	int			enclen = pg_b64_enc_len(len);
	char	   *enc = palloc(enclen + 1);
	int			n = pg_b64_encode(data, len, enc, enclen);

	if (n < 0)
		elog(ERROR, "base64 encoding failed");
	for (int i = 0; i < n; i++)
	{
		char		c = enc[i];

		if (c == '=')
			break;
		appendStringInfoChar(buf, c == '+' ? '-' : c == '/' ? '_' : c);
	}
	pfree(enc);
}

/* metering._hmac_sha256(message, key): the raw 32-byte MAC. */
PG_FUNCTION_INFO_V1(metering_hmac_sha256);
Datum
metering_hmac_sha256(PG_FUNCTION_ARGS)
{
	text	   *msg = PG_GETARG_TEXT_PP(0);
	bytea	   *key = PG_GETARG_BYTEA_PP(1);
	bytea	   *result = palloc(VARHDRSZ + PG_SHA256_DIGEST_LENGTH);

	HmacSha256((uint8 *) VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key),
			   (uint8 *) VARDATA_ANY(msg), VARSIZE_ANY_EXHDR(msg),
			   (uint8 *) VARDATA(result));
	SET_VARSIZE(result, VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	PG_RETURN_BYTEA_P(result);
}

/* metering._base64url(data): base64url text without padding. */
PG_FUNCTION_INFO_V1(metering_base64url);
Datum
metering_base64url(PG_FUNCTION_ARGS)
{
	bytea	   *data = PG_GETARG_BYTEA_PP(0);
	StringInfoData buf;

	initStringInfo(&buf);
	AppendBase64Url(&buf, VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}

/*
 * metering._jwt_hs256(header, claims, secret): a compact JWS.  Header and
 * claims are JSON texts, encoded as given.
 */
PG_FUNCTION_INFO_V1(metering_jwt_hs256);
Datum
metering_jwt_hs256(PG_FUNCTION_ARGS)
{
	text	   *header = PG_GETARG_TEXT_PP(0);
	text	   *claims = PG_GETARG_TEXT_PP(1);
	bytea	   *secret = PG_GETARG_BYTEA_PP(2);
	uint8		mac[PG_SHA256_DIGEST_LENGTH];
	StringInfoData buf;

	initStringInfo(&buf);
	AppendBase64Url(&buf, VARDATA_ANY(header), VARSIZE_ANY_EXHDR(header));
	appendStringInfoChar(&buf, '.');
	AppendBase64Url(&buf, VARDATA_ANY(claims), VARSIZE_ANY_EXHDR(claims));
	HmacSha256((uint8 *) VARDATA_ANY(secret), VARSIZE_ANY_EXHDR(secret),
			   (uint8 *) buf.data, buf.len, mac);
	appendStringInfoChar(&buf, '.');
	AppendBase64Url(&buf, (char *) mac, sizeof(mac));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}

/* metering._random_bytes(n): n bytes from the server's strong random source. */
PG_FUNCTION_INFO_V1(metering_random_bytes);
Datum
metering_random_bytes(PG_FUNCTION_ARGS)
{
	int32		n = PG_GETARG_INT32(0);
	bytea	   *result;

	if (n < 1 || n > 1024)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("random byte count must be between 1 and 1024, not %d", n)));
	result = palloc(VARHDRSZ + n);
	MeteringRandomBytes(VARDATA(result), n);
	SET_VARSIZE(result, VARHDRSZ + n);
	PG_RETURN_BYTEA_P(result);
}
