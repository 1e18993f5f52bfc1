# The IAM role the Job's Kubernetes service account assumes with its web identity token: on EKS
# through IRSA, on GKE through the cluster's own OIDC issuer (see examples/gke). It may read specs
# and data and write artifacts under the given prefixes of one bucket, nothing else.
locals {
  issuer     = trimprefix(var.oidc_issuer_url, "https://")
  subject    = "system:serviceaccount:${var.namespace}:${var.service_account}"
  read_arns  = [for p in var.read_prefixes : "${var.bucket_arn}/${p}*"]
  write_arns = [for p in var.write_prefixes : "${var.bucket_arn}/${p}*"]
  all_prefixes = distinct(concat(
    [for p in var.read_prefixes : "${p}*"],
    [for p in var.write_prefixes : "${p}*"],
  ))
}

data "aws_iam_policy_document" "trust" {
  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.issuer}:sub"
      values   = [local.subject]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "job" {
  name                 = var.role_name
  assume_role_policy   = data.aws_iam_policy_document.trust.json
  max_session_duration = 43200
  tags                 = var.tags
}

data "aws_iam_policy_document" "access" {
  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = local.all_prefixes
    }
  }

  statement {
    sid       = "ReadSpecsAndData"
    actions   = ["s3:GetObject"]
    resources = concat(local.read_arns, local.write_arns)
  }

  statement {
    sid = "WriteArtifacts"
    actions = [
      "s3:PutObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = local.write_arns
  }

  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "access" {
  name   = "job-artifacts"
  role   = aws_iam_role.job.id
  policy = data.aws_iam_policy_document.access.json
}
