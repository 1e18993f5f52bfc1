# GKE: a GPU pool from zero and Workload Identity; artifacts in S3 through an AWS role that trusts
# the GKE cluster's own OIDC issuer (a projected token with audience sts.amazonaws.com, see
# k8s/overlays/gke), so no AWS keys live in the cluster.
provider "google" {
  project = var.project_id
  region  = var.region
}

provider "aws" {
  region = var.aws_region
}

locals {
  # GKE publishes the discovery document and keys of its service account issuer here.
  gke_issuer = "https://container.googleapis.com/v1/projects/${var.project_id}/locations/${var.location}/clusters/${var.cluster}"
}

module "gpu_pool" {
  source = "../../modules/gke-gpu-node-pool"

  project_id           = var.project_id
  cluster              = var.cluster
  location             = var.location
  node_locations       = var.node_locations
  accelerator_type     = var.accelerator_type
  machine_type         = var.machine_type
  node_service_account = var.node_service_account
  spot                 = var.spot
  max_node_count       = var.max_gpu_nodes
}

module "workload_identity" {
  source = "../../modules/gke-workload-identity"

  project_id = var.project_id
}

resource "aws_iam_openid_connect_provider" "gke" {
  url            = local.gke_issuer
  client_id_list = ["sts.amazonaws.com"]
}

module "artifacts" {
  source = "../../modules/artifact-bucket"

  name = var.bucket_name
}

module "job_identity" {
  source = "../../modules/job-identity"

  oidc_provider_arn = aws_iam_openid_connect_provider.gke.arn
  oidc_issuer_url   = local.gke_issuer
  bucket_arn        = module.artifacts.bucket_arn
  kms_key_arn       = module.artifacts.kms_key_arn
}
