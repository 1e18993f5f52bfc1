variable "project_id" {
  description = "Google Cloud project of the cluster."
  type        = string
  nullable    = false
}

variable "cluster" {
  description = "Name of the existing GKE Standard cluster (Workload Identity enabled)."
  type        = string
  nullable    = false
}

variable "location" {
  description = "Region or zone of the cluster, for example us-central1."
  type        = string
  nullable    = false
}

variable "node_locations" {
  description = "Zones for the GPU nodes where the accelerator is offered; empty means the cluster's zones."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "name" {
  description = "Name of the node pool."
  type        = string
  default     = "gpu"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$", var.name))
    error_message = "The name must be 1 to 40 lower-case letters, digits or hyphens, starting with a letter."
  }
}

variable "machine_type" {
  description = "Machine type that can carry the accelerator: g2-standard-* for nvidia-l4, a2-* for A100, a3-* for H100, n1-* for T4."
  type        = string
  default     = "g2-standard-8"
  nullable    = false
}

variable "accelerator_type" {
  description = "GPU type; GKE labels the nodes cloud.google.com/gke-accelerator with it. One of nvidia-l4, nvidia-tesla-t4, nvidia-tesla-a100, nvidia-a100-80gb, nvidia-h100-80gb, nvidia-h100-mega-80gb, nvidia-h200-141gb."
  type        = string
  default     = "nvidia-l4"
  nullable    = false

  validation {
    condition     = contains(["nvidia-l4", "nvidia-tesla-t4", "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb", "nvidia-h100-mega-80gb", "nvidia-h200-141gb"], var.accelerator_type)
    error_message = "The accelerator type must be one of nvidia-l4, nvidia-tesla-t4, nvidia-tesla-a100, nvidia-a100-80gb, nvidia-h100-80gb, nvidia-h100-mega-80gb or nvidia-h200-141gb."
  }
}

variable "accelerator_count" {
  description = "GPUs per node; must match what the machine type carries (g2-standard-8: 1)."
  type        = number
  default     = 1
  nullable    = false

  validation {
    condition     = contains([1, 2, 4, 8, 16], var.accelerator_count)
    error_message = "The accelerator count must be 1, 2, 4, 8 or 16."
  }
}

variable "gpu_driver_version" {
  description = "Driver GKE installs: LATEST (job's CUDA image needs driver 580 or newer, which DEFAULT is not on many GKE versions), DEFAULT, or INSTALLATION_DISABLED (yours to install)."
  type        = string
  default     = "LATEST"
  nullable    = false

  validation {
    condition     = contains(["DEFAULT", "LATEST", "INSTALLATION_DISABLED"], var.gpu_driver_version)
    error_message = "The GPU driver version must be DEFAULT, LATEST or INSTALLATION_DISABLED."
  }
}

variable "spot" {
  description = "Use Spot VMs. Preempted pods retry without spending the Job's backoffLimit (podFailurePolicy ignores DisruptionTarget)."
  type        = bool
  default     = false
  nullable    = false
}

variable "max_node_count" {
  description = "Most nodes in the pool across its zones; it scales down to zero when no Job needs a GPU."
  type        = number
  default     = 4
  nullable    = false

  validation {
    condition     = var.max_node_count >= 1 && var.max_node_count <= 100
    error_message = "The maximum node count must be between 1 and 100."
  }
}

variable "disk_size_gb" {
  description = "Boot disk per node in GB; holds images and the pods' emptyDir model cache and scratch (the Job requests 100 GiB)."
  type        = number
  default     = 200
  nullable    = false

  validation {
    condition     = var.disk_size_gb >= 150
    error_message = "The disk must be at least 150 GB: the job image and a pod's 100 GiB of ephemeral storage live on it."
  }
}

variable "node_service_account" {
  description = "Email of the least-privilege Google service account the nodes run as (logging, monitoring, image pulls)."
  type        = string
  nullable    = false
}

variable "labels" {
  description = "Extra Kubernetes labels for the nodes. GKE adds cloud.google.com/gke-accelerator itself; labels under cloud.google.com/ are reserved."
  type        = map(string)
  default     = {}
  nullable    = false

  validation {
    condition     = alltrue([for k in keys(var.labels) : !startswith(k, "cloud.google.com/")])
    error_message = "Labels under cloud.google.com/ are set by GKE and cannot be given here."
  }
}
