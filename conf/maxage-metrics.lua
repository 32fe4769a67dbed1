-- redis-maxage: INFO maxage as Prometheus metrics through redis_exporter's -script option.
--
--   prometheus-redis-exporter -redis.addr redis://127.0.0.1:6379 \
--       -script /usr/share/doc/redis-maxage/maxage-metrics.lua
--
-- The exporter EVALs this script on every scrape and expects a flat array of alternating
-- names and values, all strings (like an HGETALL reply); every value must parse as a number or
-- the exporter drops the whole script result for that scrape. Each pair becomes
--   redis_script_values{key="maxage_evicted_connections"} 12
-- (redis_exporter 1.45 puts the name in the `key` label of one gauge family).
--
-- What is exported:
--   * every numeric field as it is (counters such as maxage_evicted_connections,
--     maxage_evicted_max_age, maxage_evicted_manual, maxage_exempted, maxage_wakeups and gauges
--     such as maxage_tracked_clients, maxage_clients_in_grace, maxage_oldest_client_age_ms,
--     maxage_next_deadline_in_ms, maxage_registry_bytes and the numeric settings);
--   * maxage_age_histogram as one gauge per bucket: maxage_age_histogram_lt_1s, ..._ge_1h
--     (clients currently in that age band, not cumulative);
--   * maxage_mode and maxage_pacing as 0/1 state gauges: maxage_mode_enforce,
--     maxage_mode_observe, maxage_pacing_fixed, maxage_pacing_adaptive;
--   * nothing for the other text fields (rules and exemption patterns), which are not numbers.
-- The script only runs INFO, which scripts may call; it needs none of the module's commands
-- (an exporter user needs +eval and +info).

local states = {
    maxage_mode = { 'enforce', 'observe' },
    maxage_pacing = { 'fixed', 'adaptive' },
}

local result = {}
local function put(name, value)
    result[#result + 1] = name
    result[#result + 1] = tostring(value)
end

local info = redis.call('INFO', 'maxage')
for line in string.gmatch(info, '[^\r\n]+') do
    local name, value = string.match(line, '^(maxage_[%w_]+):(.*)$')
    if name then
        if tonumber(value) then
            -- The text as the server wrote it: no float formatting of large integers.
            put(name, value)
        elseif name == 'maxage_age_histogram' then
            for bucket, count in string.gmatch(value, '([%w-]+)=(%d+)') do
                put(name .. '_' .. string.gsub(bucket, '-', '_'), count)
            end
        elseif states[name] then
            local known = false
            for _, state in ipairs(states[name]) do
                put(name .. '_' .. state, value == state and 1 or 0)
                known = known or value == state
            end
            local clean = string.gsub(value, '[^%w]', '_')
            if not known and clean ~= '' then
                put(name .. '_' .. clean, 1)
            end
        end
    end
end
return result
