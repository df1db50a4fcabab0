#!/usr/bin/env bash
# One-time AWS setup for cluster/aws.yaml: security group, IAM roles + instance profiles,
# the Ray auth token secret, the ECR repository and the SSH key pair.
# Review before running; it only creates things named dino-scale*.
#
#   ADMIN_CIDR=203.0.113.7/32 VPC_ID=vpc-... BUCKET=my-dino-bucket bash cluster/aws/setup.sh
#
# ADMIN_CIDR: the only source allowed to SSH to the nodes (your office/VPN egress /32).
# Any /0 (world-open) range is refused. Dashboard, job API, MLflow: no port is opened;
# reach them through `ray dashboard cluster/aws.yaml` (an SSH tunnel).
set -euo pipefail
: "${ADMIN_CIDR:?set ADMIN_CIDR, e.g. 203.0.113.7/32}"
: "${VPC_ID:?set VPC_ID}"
: "${BUCKET:?set BUCKET (the one bucket for data and checkpoints)}"
REGION="${REGION:-us-west-2}"
NAME=dino-scale
HERE="$(cd "$(dirname "$0")" && pwd)"
case "$ADMIN_CIDR" in
  */0) echo "refusing ADMIN_CIDR=$ADMIN_CIDR: SSH must not be open to the world" >&2; exit 2 ;;
esac
ACCOUNT="$(aws sts get-caller-identity --query Account --output text)"

# Security group: SSH from ADMIN_CIDR; everything else only from members of the group.
SG_ID="$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name "$NAME" \
  --description "dino-scale Ray cluster: SSH from admin CIDR, intra-cluster only" --query GroupId --output text)"
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" \
  --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ADMIN_CIDR,Description=admin-ssh}]" \
                   "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG_ID,Description=intra-cluster}]"

# IAM: one role per node kind, policies scoped to the bucket, the secret and the repo.
render() { sed -e "s/123456789012/$ACCOUNT/g" -e "s/my-dino-bucket/$BUCKET/g" -e "s/us-west-2/$REGION/g" "$1"; }
for kind in head worker; do
  aws iam create-role --role-name "$NAME-$kind" --assume-role-policy-document "file://$HERE/ec2-trust-policy.json" >/dev/null
  aws iam put-role-policy --role-name "$NAME-$kind" --policy-name "$NAME-$kind" \
    --policy-document "$(render "$HERE/iam-$kind-policy.json")"
  aws iam create-instance-profile --instance-profile-name "$NAME-$kind" >/dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$NAME-$kind" --role-name "$NAME-$kind"
done

# The Ray token: generated here, stored only in Secrets Manager (never printed or written).
aws secretsmanager create-secret --region "$REGION" --name "$NAME/ray-auth-token" \
  --description "Ray token auth for the dino-scale cluster" \
  --secret-string "$(openssl rand -hex 32)" >/dev/null

aws ecr create-repository --region "$REGION" --repository-name "$NAME" \
  --image-scanning-configuration scanOnPush=true >/dev/null
if [ ! -f ~/.ssh/dino-scale.pem ]; then
  (umask 077 && aws ec2 create-key-pair --region "$REGION" --key-name "$NAME" --key-type ed25519 \
     --query KeyMaterial --output text > ~/.ssh/dino-scale.pem)
fi

echo "Put these in cluster/aws.yaml:"
echo "  SecurityGroupIds: [$SG_ID]"
echo "  IamInstanceProfile Arn: arn:aws:iam::$ACCOUNT:instance-profile/$NAME-head / $NAME-worker"
echo "  docker image: $ACCOUNT.dkr.ecr.$REGION.amazonaws.com/$NAME:<tag>; ImageId, SubnetIds"
