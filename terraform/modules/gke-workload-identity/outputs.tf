output "email" {
  description = "Email of the Google service account: the iam.gke.io/gcp-service-account annotation of k8s/overlays/gke."
  value       = google_service_account.job.email
}
