variable "project_id" {
  description = "Google Cloud project of the cluster."
  type        = string
  nullable    = false
}

variable "region" {
  description = "Default Google Cloud region."
  type        = string
  default     = "us-central1"
  nullable    = false
}

variable "location" {
  description = "Region or zone of the existing GKE Standard cluster."
  type        = string
  default     = "us-central1"
  nullable    = false
}

variable "cluster" {
  description = "Name of the existing GKE Standard cluster (Workload Identity enabled)."
  type        = string
  nullable    = false
}

variable "node_locations" {
  description = "Zones that offer the accelerator."
  type        = list(string)
  default     = ["us-central1-a", "us-central1-c"]
  nullable    = false
}

variable "accelerator_type" {
  description = "GPU type; k8s/overlays/gke selects nvidia-l4, change its nodeSelector with this."
  type        = string
  default     = "nvidia-l4"
  nullable    = false
}

variable "machine_type" {
  description = "Machine type carrying the accelerator."
  type        = string
  default     = "g2-standard-8"
  nullable    = false
}

variable "node_service_account" {
  description = "Email of the Google service account the GPU nodes run as."
  type        = string
  nullable    = false
}

variable "spot" {
  description = "Use Spot VMs for the GPU nodes."
  type        = bool
  default     = true
  nullable    = false
}

variable "max_gpu_nodes" {
  description = "Most GPU nodes at once."
  type        = number
  default     = 4
  nullable    = false
}

variable "aws_region" {
  description = "AWS region of the artifact bucket."
  type        = string
  default     = "us-east-1"
  nullable    = false
}

variable "bucket_name" {
  description = "Globally unique name of the S3 artifact bucket."
  type        = string
  nullable    = false
}
