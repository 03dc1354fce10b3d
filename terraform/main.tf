# Provisions nomad-transcode on an existing Nomad cluster: the scaler and worker jobs, with the
# worker count as a variable so the scaler's `command` target can run
#   terraform apply -auto-approve -var worker_nodes=N
# Machines themselves (cloud instances running Nomad clients) are the operator's own module;
# wire its node count to var.worker_nodes in the same way.
terraform {
  required_version = ">= 1.5"
  required_providers {
    nomad = {
      source  = "hashicorp/nomad"
      version = ">= 2.0"
    }
  }
}

provider "nomad" {
  address = var.nomad_address
  region  = var.nomad_region
}

resource "nomad_job" "scaler" {
  jobspec = file("${path.module}/../jobs/transcode-scaler.nomad.hcl")

  hcl2 {
    vars = {
      store_url   = var.store_url
      s3_endpoint = var.s3_endpoint
      binary_url  = var.scaler_binary_url
      datacenters = jsonencode(var.datacenters)
    }
  }
}

resource "nomad_job" "worker" {
  jobspec = file("${path.module}/../jobs/transcode-worker.nomad.hcl")

  hcl2 {
    vars = {
      store_url   = var.store_url
      s3_endpoint = var.s3_endpoint
      workers     = var.worker_nodes * var.workers_per_node
      datacenters = jsonencode(var.datacenters)
    }
  }

  depends_on = [nomad_job.scaler]
}
