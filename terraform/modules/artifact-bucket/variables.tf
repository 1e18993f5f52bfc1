variable "name" {
  description = "Globally unique bucket name."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.name)) && !can(regex("\\.\\.", var.name))
    error_message = "The bucket name must be 3 to 63 lower-case letters, digits, dots or hyphens, starting and ending with a letter or digit."
  }
}

variable "kms_key_arn" {
  description = "KMS key for server-side encryption; null creates a key with rotation enabled."
  type        = string
  default     = null
}

variable "abort_incomplete_upload_days" {
  description = "Days after which the parts of an unfinished multipart upload are deleted."
  type        = number
  default     = 2
  nullable    = false

  validation {
    condition     = var.abort_incomplete_upload_days >= 1
    error_message = "Incomplete uploads must be kept at least 1 day, or uploads still running would lose their parts."
  }
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept before it expires."
  type        = number
  default     = 30
  nullable    = false

  validation {
    condition     = var.noncurrent_version_days >= 1
    error_message = "Noncurrent versions must be kept at least 1 day."
  }
}

variable "access_log_bucket" {
  description = "Bucket that receives server access logs; null turns access logging off."
  type        = string
  default     = null
}

variable "tags" {
  description = "AWS tags for the bucket and its KMS key."
  type        = map(string)
  default     = {}
  nullable    = false
}
