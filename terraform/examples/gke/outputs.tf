output "aws_role_arn" {
  description = "AWS_ROLE_ARN of the Job on GKE (render --env AWS_ROLE_ARN=..., or k8s/overlays/gke/job-patch.yaml)."
  value       = module.job_identity.role_arn
}

output "gcp_service_account" {
  description = "Put this in the iam.gke.io/gcp-service-account annotation of the job-runner service account."
  value       = module.workload_identity.email
}

output "bucket_name" {
  description = "Artifact bucket: upload specs under specs/, publish runs under runs/."
  value       = module.artifacts.bucket_name
}
