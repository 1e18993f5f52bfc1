variable "region" {
  description = "AWS region of the cluster and the bucket."
  type        = string
  default     = "us-east-1"
  nullable    = false
}

variable "cluster_name" {
  description = "Name of the existing EKS cluster (IRSA enabled)."
  type        = string
  nullable    = false
}

variable "subnet_ids" {
  description = "Private subnets for the GPU nodes."
  type        = list(string)
  nullable    = false
}

variable "instance_types" {
  description = "GPU instance types, in order of preference."
  type        = list(string)
  default     = ["g6.2xlarge"]
  nullable    = false
}

variable "spot" {
  description = "Use Spot capacity for the GPU nodes."
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

variable "bucket_name" {
  description = "Globally unique name of the artifact bucket."
  type        = string
  nullable    = false
}
