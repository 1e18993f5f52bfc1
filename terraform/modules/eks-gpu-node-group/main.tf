# A GPU managed node group that scales from zero. The label and taint below are what
# k8s/overlays/eks selects and tolerates; tests/deploy/test_terraform.py keeps them equal.
locals {
  gpu_labels = {
    "nvidia.com/gpu.present" = "true"
  }
  gpu_taint = {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }
}

data "aws_partition" "current" {}

resource "aws_iam_role" "node" {
  name_prefix = "${var.name}-node-"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
  ])
  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = var.cluster_name
  node_group_name = var.name
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = var.subnet_ids

  # Amazon Linux 2023 with the NVIDIA driver and container toolkit.
  ami_type       = "AL2023_x86_64_NVIDIA"
  capacity_type  = var.spot ? "SPOT" : "ON_DEMAND"
  instance_types = var.instance_types
  disk_size      = var.disk_size_gb

  scaling_config {
    min_size     = 0
    desired_size = 0
    max_size     = var.max_size
  }

  labels = merge(var.labels, local.gpu_labels)

  taint {
    key    = local.gpu_taint.key
    value  = local.gpu_taint.value
    effect = local.gpu_taint.effect
  }

  update_config {
    max_unavailable = 1
  }

  tags = var.tags

  # The autoscaler owns the size once nodes exist.
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}

# Scaling from zero: with no node to look at, the Cluster Autoscaler reads the labels, taints and
# GPU count of a future node from these tags on the group's Auto Scaling group.
resource "aws_autoscaling_group_tag" "node_template" {
  for_each = merge(
    { for k, v in merge(var.labels, local.gpu_labels) : "k8s.io/cluster-autoscaler/node-template/label/${k}" => v },
    {
      "k8s.io/cluster-autoscaler/node-template/taint/${local.gpu_taint.key}" = "${local.gpu_taint.value}:NoSchedule"
      "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"     = tostring(var.gpus_per_node)
    },
  )

  autoscaling_group_name = aws_eks_node_group.gpu.resources[0].autoscaling_groups[0].name

  tag {
    key                 = each.key
    value               = each.value
    propagate_at_launch = false
  }
}
