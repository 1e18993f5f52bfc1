# Workload Identity for the Job's Kubernetes service account: pods act as this Google service
# account for Google APIs. It gets no project roles; grant it only what a deployment needs
# (for example roles/artifactregistry.reader on a private image repository).
resource "google_service_account" "job" {
  project      = var.project_id
  account_id   = var.account_id
  display_name = "job runner (Kubernetes ${var.namespace}/${var.service_account})"
}

resource "google_service_account_iam_member" "workload_identity" {
  service_account_id = google_service_account.job.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/${var.service_account}]"
}
