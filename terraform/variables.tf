variable "nomad_address" {
  type    = string
  default = "http://127.0.0.1:4646"
}

variable "nomad_region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "store_url" {
  type        = string
  description = "PostgreSQL URL (credentials preferably from Vault)"
  sensitive   = true
}

variable "s3_endpoint" {
  type    = string
  default = ""
}

variable "scaler_binary_url" {
  type        = string
  description = "Artifact URL of the transcode-scaler binary"
}

variable "worker_nodes" {
  type        = number
  default     = 1
  description = "Worker nodes; the scaler's command target sets it"
  validation {
    condition     = var.worker_nodes >= 0 && var.worker_nodes <= 1000
    error_message = "worker_nodes must be between 0 and 1000."
  }
}

variable "workers_per_node" {
  type    = number
  default = 2
}
