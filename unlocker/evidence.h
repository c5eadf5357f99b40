// Collects instance evidence from the cloud metadata service.
#pragma once

#include <json/value.h>

#include <string>

#include "core/status.h"

namespace keygate::unlocker {

constexpr char kDefaultMetadataUrl[] = "http://169.254.169.254";

// AWS IMDSv2: a session token (PUT /latest/api/token), then the rsa2048
// signature of the instance identity document. Returns
// {"aws": {"rsa2048": "<base64 CMS>"}}. Failures are kUnavailable.
Result<Json::Value> collect_aws_evidence(const std::string& metadata_url, long timeout_ms);

}  // namespace keygate::unlocker
