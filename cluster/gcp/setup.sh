#!/usr/bin/env bash
# One-time Google Cloud setup for cluster/gcp.yaml: VPC subnet + firewall, node service
# accounts with bucket-scoped storage access, the Ray auth token secret, Artifact Registry.
# Review before running; it only creates things named dino-scale*.
#
#   ADMIN_CIDR=203.0.113.7/32 PROJECT=my-gcp-project BUCKET=my-dino-bucket bash cluster/gcp/setup.sh
#
# ADMIN_CIDR: the only source allowed to SSH to the head; any /0 range is refused.
# No firewall rule opens the dashboard, job API or MLflow: use `ray dashboard cluster/gcp.yaml`.
set -euo pipefail
: "${ADMIN_CIDR:?set ADMIN_CIDR, e.g. 203.0.113.7/32}"
: "${PROJECT:?set PROJECT}"
: "${BUCKET:?set BUCKET (the one bucket for data and checkpoints)}"
REGION="${REGION:-us-central1}"
NAME=dino-scale
case "$ADMIN_CIDR" in
  */0) echo "refusing ADMIN_CIDR=$ADMIN_CIDR: SSH must not be open to the world" >&2; exit 2 ;;
esac
g() { gcloud --project "$PROJECT" "$@"; }

# the APIs the steps below call (a fresh project has none of them on: the script stopped part-way)
g services enable compute.googleapis.com iam.googleapis.com secretmanager.googleapis.com \
  artifactregistry.googleapis.com cloudresourcemanager.googleapis.com

g compute networks create "$NAME" --subnet-mode=custom
g compute networks subnets create "$NAME" --network "$NAME" --region "$REGION" \
  --range 10.42.0.0/20 --enable-private-ip-google-access
# Workers have no external IP: Cloud NAT lets them reach package mirrors if ever needed;
# GCS, Artifact Registry and Secret Manager go through Private Google Access.
g compute routers create "$NAME" --network "$NAME" --region "$REGION"
g compute routers nats create "$NAME" --router "$NAME" --region "$REGION" \
  --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges
g compute firewall-rules create "$NAME-ssh-admin" --network "$NAME" --direction INGRESS \
  --action ALLOW --rules tcp:22 --source-ranges "$ADMIN_CIDR" --target-tags "$NAME-head"
g compute firewall-rules create "$NAME-intra" --network "$NAME" --direction INGRESS \
  --action ALLOW --rules all --source-tags "$NAME" --target-tags "$NAME"

for kind in head worker; do
  g iam service-accounts create "$NAME-$kind" --display-name "dino-scale Ray $kind"
  SA="$NAME-$kind@$PROJECT.iam.gserviceaccount.com"
  # Storage: the one bucket only (no project-wide storage role).
  gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --member "serviceAccount:$SA" \
    --role roles/storage.objectAdmin
done
# The head's autoscaler creates and deletes worker VMs that run as the worker account.
g projects add-iam-policy-binding "$PROJECT" --role roles/compute.instanceAdmin.v1 \
  --member "serviceAccount:$NAME-head@$PROJECT.iam.gserviceaccount.com"
g iam service-accounts add-iam-policy-binding "$NAME-worker@$PROJECT.iam.gserviceaccount.com" \
  --role roles/iam.serviceAccountUser --member "serviceAccount:$NAME-head@$PROJECT.iam.gserviceaccount.com"

g artifacts repositories create "$NAME" --repository-format docker --location "$REGION"
for kind in head worker; do
  g artifacts repositories add-iam-policy-binding "$NAME" --location "$REGION" \
    --member "serviceAccount:$NAME-$kind@$PROJECT.iam.gserviceaccount.com" --role roles/artifactregistry.reader
done

# The Ray token: generated here, stored only in Secret Manager, readable by the two accounts.
openssl rand -hex 32 | g secrets create "$NAME-ray-auth-token" --data-file=- --replication-policy automatic
for kind in head worker; do
  g secrets add-iam-policy-binding "$NAME-ray-auth-token" \
    --member "serviceAccount:$NAME-$kind@$PROJECT.iam.gserviceaccount.com" --role roles/secretmanager.secretAccessor
done
[ -f ~/.ssh/dino-scale-gcp ] || ssh-keygen -t ed25519 -N "" -C ubuntu -f ~/.ssh/dino-scale-gcp
echo "Paste ~/.ssh/dino-scale-gcp.pub into the ssh-keys metadata of cluster/gcp.yaml."
