output "role_arn" {
  description = "Put this in the eks.amazonaws.com/role-arn annotation of the job-runner service account."
  value       = module.job_identity.role_arn
}

output "bucket_name" {
  description = "Artifact bucket: upload specs under specs/, publish runs under runs/."
  value       = module.artifacts.bucket_name
}

output "node_taint" {
  description = "Taint of the GPU nodes (k8s/overlays/eks tolerates it)."
  value       = module.gpu_nodes.node_taint
}
