// The library's environment settings (CUSTOM_BN_*), read one way. Unset or empty gives the
// fallback; any other value must parse, or the first call that reads the setting raises
// c10::ValueError (Python's ValueError) naming the variable, what it takes and what came.
// Each setting is read once per process by its user, which keeps the result.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

namespace custom_bn {

// One of `choices`, matched without regard to case, returned as spelled in `choices`.
std::string choice_setting(const char* name, std::initializer_list<const char*> choices,
                           const char* fallback);

// A whole number at least `minimum`; `what` says what it counts ("a number of megabytes").
int64_t count_setting(const char* name, const char* what, int64_t minimum, int64_t fallback);

// 0 or 1.
bool flag_setting(const char* name, bool fallback);

}  // namespace custom_bn
