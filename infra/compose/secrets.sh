#!/bin/sh
# Prints a fresh set of every secret compose.yaml asks for, one random
# 32-byte hex value each, in the form of compose's .env file:
#
#   sh infra/compose/secrets.sh > .env && chmod 600 .env
#
# compose refuses to start while any of them is unset. Run it once: new
# secrets for an existing stack lock its services out of the data volumes'
# users until MinIO's users are made again (docker compose up minio-users).
set -eu
secret() {
	if command -v openssl >/dev/null 2>&1; then
		openssl rand -hex 32
	else
		od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
		echo
	fi
}
for name in \
	NATS_SYS_PASSWORD NATS_ADMIN_PASSWORD NATS_MINIO_PASSWORD \
	NATS_INGEST_PASSWORD NATS_CONVERT_PASSWORD NATS_NOTIFY_PASSWORD \
	NATS_CLI_PASSWORD NATS_OPERATOR_PASSWORD NATS_ROUTE_PASSWORD \
	MINIO_ROOT_PASSWORD \
	S3_SETUP_SECRET_KEY S3_INGEST_SECRET_KEY S3_CONVERT_SECRET_KEY; do
	# A leading letter: NATS reads an all-digit value as a number.
	printf '%s=s%s\n' "$name" "$(secret)"
done
