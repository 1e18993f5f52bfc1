variable "role_name" {
  description = "Name of the IAM role; the service account's annotation or AWS_ROLE_ARN points at it."
  type        = string
  default     = "job-runner"
  nullable    = false
}

variable "oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider of the cluster's service account issuer (EKS: the cluster's IRSA provider)."
  type        = string
  nullable    = false
}

variable "oidc_issuer_url" {
  description = "Issuer URL of the cluster's service account tokens, with or without https://."
  type        = string
  nullable    = false
}

variable "namespace" {
  description = "Namespace of the Job's service account (k8s/base/kustomization.yaml: ml-jobs)."
  type        = string
  default     = "ml-jobs"
  nullable    = false
}

variable "service_account" {
  description = "Name of the Job's service account (k8s/base/serviceaccount.yaml: job-runner)."
  type        = string
  default     = "job-runner"
  nullable    = false
}

variable "bucket_arn" {
  description = "ARN of the artifact bucket."
  type        = string
  nullable    = false
}

variable "kms_key_arn" {
  description = "ARN of the KMS key that encrypts the bucket."
  type        = string
  nullable    = false
}

variable "read_prefixes" {
  description = "Key prefixes the job may read (specs and datasets), each ending in /."
  type        = list(string)
  default     = ["specs/", "data/"]
  nullable    = false

  validation {
    condition     = alltrue([for p in var.read_prefixes : can(regex("^[^*]+/$", p))])
    error_message = "Each read prefix must be a non-empty key prefix ending in / and without wildcards."
  }
}

variable "write_prefixes" {
  description = "Key prefixes the job may write (published runs), each ending in /."
  type        = list(string)
  default     = ["runs/"]
  nullable    = false

  validation {
    condition     = length(var.write_prefixes) > 0 && alltrue([for p in var.write_prefixes : can(regex("^[^*]+/$", p))])
    error_message = "Give at least one write prefix; each must end in / and contain no wildcards."
  }
}

variable "tags" {
  description = "AWS tags for the role."
  type        = map(string)
  default     = {}
  nullable    = false
}
