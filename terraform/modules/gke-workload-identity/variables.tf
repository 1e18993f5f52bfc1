variable "project_id" {
  description = "Google Cloud project of the cluster (its Workload Identity pool is PROJECT.svc.id.goog)."
  type        = string
  nullable    = false
}

variable "account_id" {
  description = "Account id of the Google service account."
  type        = string
  default     = "job-runner"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{4,28}[a-z0-9])$", var.account_id))
    error_message = "The account id must be 6 to 30 lower-case letters, digits or hyphens, starting with a letter."
  }
}

variable "namespace" {
  description = "Namespace of the Job's Kubernetes service account (k8s/base/kustomization.yaml: ml-jobs)."
  type        = string
  default     = "ml-jobs"
  nullable    = false
}

variable "service_account" {
  description = "Name of the Job's Kubernetes service account (k8s/base/serviceaccount.yaml: job-runner)."
  type        = string
  default     = "job-runner"
  nullable    = false
}
