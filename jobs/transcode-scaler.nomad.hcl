# The scaler: intake, dispatch, event forwarder and recovery. One active instance; a second
# allocation may run as a standby once leader election lands (docs/status.md).
# Run: nomad job run -var 'store_url=postgres://…' jobs/transcode-scaler.nomad.hcl
variable "store_url" {
  type        = string
  description = "PostgreSQL URL of the transcode database"
}

variable "s3_endpoint" {
  type    = string
  default = ""
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "binary_url" {
  type        = string
  description = "Where Nomad downloads the transcode-scaler binary (an artifact URL)"
}

job "transcode-scaler" {
  datacenters = var.datacenters
  type        = "service"

  group "scaler" {
    count = 1

    network {
      port "intake" { static = 5570 }
      port "dispatch" { static = 5571 }
      port "events_pub" { static = 5572 }
      port "events_sub" { static = 5573 }
      # Workers join the scaler's gossip here (TCP and UDP).
      port "gossip" { static = 7946 }
      port "http" {}
    }

    # Consul shows these in its UI health views; /v1/health is 503 when the store is down.
    service {
      name     = "transcode-scaler"
      port     = "http"
      provider = "consul"
      tags     = ["transcode", "metrics"]

      check {
        type     = "http"
        path     = "/v1/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    service {
      name     = "transcode-intake"
      port     = "intake"
      provider = "consul"
    }

    service {
      name     = "transcode-dispatch"
      port     = "dispatch"
      provider = "consul"
    }

    task "scaler" {
      driver = "exec"

      artifact {
        source = var.binary_url
      }

      config {
        command = "local/transcode-scaler"
        args = [
          "--migrate",
          "--intake", "tcp://0.0.0.0:${NOMAD_PORT_intake}",
          "--dispatch", "tcp://0.0.0.0:${NOMAD_PORT_dispatch}",
          "--events-pub", "tcp://0.0.0.0:${NOMAD_PORT_events_pub}",
          "--events-sub", "tcp://0.0.0.0:${NOMAD_PORT_events_sub}",
          "--http", "0.0.0.0:${NOMAD_PORT_http}",
          "--gossip-bind", "0.0.0.0:${NOMAD_PORT_gossip}",
          "--id", "scaler-${NOMAD_ALLOC_ID}",
          "--node", "${node.unique.name}",
        ]
      }

      env {
        TRANSCODE_STORE_URL = var.store_url
        # Bound to every interface, so peers need the address to reach it by.
        TRANSCODE_MEMBERSHIP_ADVERTISE = "${NOMAD_ADDR_gossip}"
        TRANSCODE_LOG       = "info"
      }

      # Credentials for the database and S3 come from Vault, never from the jobspec.
      template {
        destination = "secrets/aws.env"
        env         = true
        data        = <<-EOT
          {{ with secret "kv/data/transcode/s3" }}
          AWS_ACCESS_KEY_ID={{ .Data.data.access_key_id }}
          AWS_SECRET_ACCESS_KEY={{ .Data.data.secret_access_key }}
          {{ end }}
        EOT
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
