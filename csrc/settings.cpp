// The environment settings reader (settings.h).
#include "settings.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <optional>
#include <sstream>

namespace custom_bn {
namespace {

std::optional<std::string> raw_setting(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

}  // namespace

std::string choice_setting(const char* name, std::initializer_list<const char*> choices,
                           const char* fallback) {
  const std::optional<std::string> value = raw_setting(name);
  if (!value) return fallback;
  std::ostringstream expected;
  for (const char* choice : choices) {
    if (lower(*value) == lower(choice)) return choice;
    expected << (expected.tellp() > 0 ? ", " : "") << choice;
  }
  TORCH_CHECK_VALUE(false, name, " must be one of ", expected.str(), ", got '", *value, "'");
}

int64_t count_setting(const char* name, const char* what, int64_t minimum, int64_t fallback) {
  const std::optional<std::string> value = raw_setting(name);
  if (!value) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long count = std::strtoll(value->c_str(), &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && errno == 0 && count >= minimum, name, " must be ", what,
                    minimum > 0 ? " (at least " : "", minimum > 0 ? std::to_string(minimum) : "",
                    minimum > 0 ? ")" : "", ", got '", *value, "'");
  return count;
}

bool flag_setting(const char* name, bool fallback) {
  return choice_setting(name, {"0", "1"}, fallback ? "1" : "0") == "1";
}

}  // namespace custom_bn
