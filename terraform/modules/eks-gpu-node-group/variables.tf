variable "cluster_name" {
  description = "Name of the existing EKS cluster the node group joins."
  type        = string
  nullable    = false
}

variable "name" {
  description = "Name of the node group; also the prefix of its node IAM role."
  type        = string
  default     = "gpu"
  nullable    = false

  validation {
    condition     = can(regex("^[a-zA-Z0-9][a-zA-Z0-9_-]{0,37}$", var.name))
    error_message = "The name must be 1 to 38 letters, digits, hyphens or underscores, starting with a letter or digit."
  }
}

variable "subnet_ids" {
  description = "Private subnets for the GPU nodes, in the zones where the instance types are offered."
  type        = list(string)
  nullable    = false

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Give at least one subnet for the GPU nodes."
  }
}

variable "instance_types" {
  description = "GPU instance types, in order of preference; for example g6.2xlarge (L4), g5.2xlarge (A10G), p4d.24xlarge (A100)."
  type        = list(string)
  default     = ["g6.2xlarge"]
  nullable    = false

  validation {
    condition     = length(var.instance_types) > 0 && alltrue([for t in var.instance_types : can(regex("^(g4dn|g5|g5g|g6|g6e|gr6|p3|p4d|p4de|p5|p5e|p5en)\\.", t))])
    error_message = "Every instance type must be an NVIDIA GPU type (g4dn, g5, g6, g6e, gr6, p3, p4d, p4de, p5, p5e, p5en families)."
  }
}

variable "gpus_per_node" {
  description = "GPUs on one node of the first instance type; tells the Cluster Autoscaler what a node from zero provides."
  type        = number
  default     = 1
  nullable    = false

  validation {
    condition     = var.gpus_per_node >= 1 && var.gpus_per_node <= 16
    error_message = "The number of GPUs per node must be between 1 and 16."
  }
}

variable "spot" {
  description = "Use Spot capacity. Preempted pods retry without spending the Job's backoffLimit (podFailurePolicy ignores DisruptionTarget)."
  type        = bool
  default     = false
  nullable    = false
}

variable "max_size" {
  description = "Most nodes the group scales up to; it scales down to zero when no Job needs a GPU."
  type        = number
  default     = 4
  nullable    = false

  validation {
    condition     = var.max_size >= 1 && var.max_size <= 100
    error_message = "The maximum size must be between 1 and 100 nodes."
  }
}

variable "disk_size_gb" {
  description = "Root volume per node in GiB; holds images and the pods' emptyDir model cache and scratch (the Job requests 100 GiB)."
  type        = number
  default     = 200
  nullable    = false

  validation {
    condition     = var.disk_size_gb >= 150
    error_message = "The disk must be at least 150 GiB: the job image and a pod's 100 GiB of ephemeral storage live on it."
  }
}

variable "labels" {
  description = "Extra Kubernetes labels for the nodes; the GPU label nvidia.com/gpu.present=true is always set."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "tags" {
  description = "AWS tags for the node group and its IAM role."
  type        = map(string)
  default     = {}
  nullable    = false
}
