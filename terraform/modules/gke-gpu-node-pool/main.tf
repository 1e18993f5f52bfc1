# A GPU node pool that scales from zero, with GKE-managed NVIDIA drivers. GKE labels each node
# cloud.google.com/gke-accelerator=<accelerator type>; the taint is stated here so that it holds
# even in a cluster of GPU pools only. k8s/overlays/gke selects and tolerates exactly these
# (tests/deploy/test_terraform.py keeps them equal).
locals {
  gpu_taint = {
    key    = "nvidia.com/gpu"
    value  = "present"
    effect = "NO_SCHEDULE"
  }
}

resource "google_container_node_pool" "gpu" {
  name     = var.name
  project  = var.project_id
  cluster  = var.cluster
  location = var.location

  node_locations = length(var.node_locations) > 0 ? var.node_locations : null

  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.max_node_count
    location_policy      = var.spot ? "ANY" : "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = var.machine_type
    image_type   = "COS_CONTAINERD"
    disk_type    = "pd-ssd"
    disk_size_gb = var.disk_size_gb
    spot         = var.spot

    guest_accelerator {
      type  = var.accelerator_type
      count = var.accelerator_count

      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    labels = var.labels

    taint {
      key    = local.gpu_taint.key
      value  = local.gpu_taint.value
      effect = local.gpu_taint.effect
    }

    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    # Pods get their identity through Workload Identity, never the node's.
    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  # The autoscaler owns the size.
  lifecycle {
    ignore_changes = [initial_node_count]
  }
}
