output "node_pool_name" {
  description = "Name of the GPU node pool."
  value       = google_container_node_pool.gpu.name
}

output "node_selector" {
  description = "The node label GKE sets on these nodes (k8s/overlays/gke selects it)."
  value       = { "cloud.google.com/gke-accelerator" = var.accelerator_type }
}

output "node_taint" {
  description = "The taint on every GPU node, as key=value:Effect (k8s/overlays/gke tolerates it)."
  value       = "${local.gpu_taint.key}=${local.gpu_taint.value}:NoSchedule"
}
