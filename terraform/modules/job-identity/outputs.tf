output "role_arn" {
  description = "ARN of the role: the eks.amazonaws.com/role-arn annotation (EKS) or AWS_ROLE_ARN (GKE)."
  value       = aws_iam_role.job.arn
}

output "service_account_subject" {
  description = "The only token subject the role trusts."
  value       = local.subject
}
