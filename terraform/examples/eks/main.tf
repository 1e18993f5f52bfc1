# EKS: GPU nodes from zero, the artifact bucket, and the IRSA role of the Job's service account.
# Assumes an existing cluster with its IAM OIDC provider (IRSA) enabled.
provider "aws" {
  region = var.region
}

data "aws_eks_cluster" "this" {
  name = var.cluster_name
}

data "aws_iam_openid_connect_provider" "cluster" {
  url = data.aws_eks_cluster.this.identity[0].oidc[0].issuer
}

module "gpu_nodes" {
  source = "../../modules/eks-gpu-node-group"

  cluster_name   = var.cluster_name
  subnet_ids     = var.subnet_ids
  instance_types = var.instance_types
  spot           = var.spot
  max_size       = var.max_gpu_nodes
}

module "artifacts" {
  source = "../../modules/artifact-bucket"

  name = var.bucket_name
}

module "job_identity" {
  source = "../../modules/job-identity"

  oidc_provider_arn = data.aws_iam_openid_connect_provider.cluster.arn
  oidc_issuer_url   = data.aws_eks_cluster.this.identity[0].oidc[0].issuer
  bucket_arn        = module.artifacts.bucket_arn
  kms_key_arn       = module.artifacts.kms_key_arn
}
