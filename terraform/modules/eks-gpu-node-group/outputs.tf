output "node_group_name" {
  description = "Name of the GPU node group."
  value       = aws_eks_node_group.gpu.node_group_name
}

output "node_role_arn" {
  description = "ARN of the IAM role of the GPU nodes."
  value       = aws_iam_role.node.arn
}

output "node_labels" {
  description = "Kubernetes labels every GPU node carries (k8s/overlays/eks selects them)."
  value       = aws_eks_node_group.gpu.labels
}

output "node_taint" {
  description = "The taint on every GPU node, as key=value:Effect (k8s/overlays/eks tolerates it)."
  value       = "${local.gpu_taint.key}=${local.gpu_taint.value}:NoSchedule"
}
