output "worker_allocations" {
  description = "Worker allocations requested"
  value       = var.worker_nodes * var.workers_per_node
}

output "scaler_job_id" {
  value = nomad_job.scaler.id
}
