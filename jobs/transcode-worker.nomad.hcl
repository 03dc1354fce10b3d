# Transcoding workers, run by the nomad-driver-transcode task driver (docs/driver.md).
# Scale with `nomad job scale transcode-worker workers N`, or let transcode-scaler's `nomad`
# target do it. Run: nomad job run -var 'store_url=postgres://…' jobs/transcode-worker.nomad.hcl
variable "store_url" {
  type = string
}

variable "s3_endpoint" {
  type    = string
  default = ""
}

variable "scaler_host" {
  type        = string
  default     = "transcode-dispatch.service.consul"
  description = "Where workers find the scaler's dispatch and event sockets"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "workers" {
  type    = number
  default = 2
}

job "transcode-worker" {
  datacenters = var.datacenters
  type        = "service"

  group "workers" {
    count = var.workers

    # Only nodes whose driver fingerprinted a usable H.264 encoder.
    constraint {
      attribute = "${attr.driver.transcode.encoder.x264enc}"
      value     = "true"
    }

    spread {
      attribute = "${node.unique.id}"
    }

    network {
      port "http" {}
      # Gossip (TCP and UDP). The port stays with the allocation across task restarts, so a
      # restarted worker rejoins at the same address (docs/gossip.md).
      port "gossip" {}
    }

    service {
      name     = "transcode-worker"
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

    task "worker" {
      driver = "transcode"

      config {
        scaler_address = "tcp://${var.scaler_host}:5571"
        events_address = "tcp://${var.scaler_host}:5573"
        store_url      = var.store_url
        s3_endpoint    = var.s3_endpoint
        slots          = 2
        drain_timeout  = "25s"
        args = [
          "--http", "0.0.0.0:${NOMAD_PORT_http}",
          "--gossip-bind", "0.0.0.0:${NOMAD_PORT_gossip}",
          "--gossip-join", "${var.scaler_host}:7946",
        ]
      }

      env {
        TRANSCODE_MEMBERSHIP_ADVERTISE = "${NOMAD_ADDR_gossip}"
      }

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

      # The worker drains on SIGTERM: running transcodes finish, unfinished ones go back to
      # the queue. Nomad caps kill_timeout at the client's max_kill_timeout (30 s by default).
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
