#!/bin/sh
# Creates a MinIO user per imagepipe function with the policy of
# infra/minio/iam/<function>.json, taking each user's access and secret key
# from that function's env file: one place per secret. Safe to run again:
# policies are replaced, secrets reset, attachments kept.
#
# Usage: create-users.sh ENV_DIR IAM_DIR   (with mc, and MINIO_ROOT_USER,
# MINIO_ROOT_PASSWORD and MINIO_URL in the environment)
set -eu
env_dir=$1
iam_dir=$2
mc alias set imagepipe "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null

# Plain sh: the MinIO image has no grep or sed to lean on.
value() {
	while IFS='=' read -r k v; do
		[ "$k" = "$2" ] && { printf '%s' "$v"; return; }
	done <"$1"
	echo "$2 missing in $1" >&2
	exit 1
}

# A value may be a compose variable, ${NAME:?why}: compose fills it in for
# the functions, and here it names the variable of this script's
# environment that holds the secret.
resolve() {
	case "$1" in
	'${'*)
		name=${1#??}
		name=${name%%[!A-Za-z0-9_]*}
		case "$name" in
		'') echo "unreadable variable reference $1" >&2; exit 1 ;;
		esac
		eval "printf '%s' \"\${$name:?$name is not set}\""
		;;
	*) printf '%s' "$1" ;;
	esac
}

for fn in setup ingest convert; do
	access=$(value "$env_dir/$fn.env" IMAGEPIPE_S3_ACCESS_KEY)
	secret=$(resolve "$(value "$env_dir/$fn.env" IMAGEPIPE_S3_SECRET_KEY)")
	mc admin policy create imagepipe "imagepipe-$fn" "$iam_dir/$fn.json"
	mc admin user add imagepipe "$access" "$secret"
	case "$(mc admin user info imagepipe "$access")" in
	*"imagepipe-$fn"*) ;;
	*) mc admin policy attach imagepipe "imagepipe-$fn" --user "$access" ;;
	esac
done
