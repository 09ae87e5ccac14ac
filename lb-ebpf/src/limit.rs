//! The per-CPU rate limit on answers the program generates (TCP RST, ICMP errors): a
//! spoofed flood must not turn the load balancer into a reflector.

use lb_common::stats::DropReason;

use crate::{
    flow_table::cpu_state,
    maps::{config, count_drop, now_ns},
};

/// Whether one more answer may be sent now; counts `rate_limited` against `service_id`
/// when not. A generic cell rate algorithm: each answer moves the theoretical arrival
/// time on by one interval, and answers may run at most the burst ahead of the clock.
#[inline(always)]
pub fn allow_answer(service_id: u32) -> bool {
    let Some(st) = cpu_state() else {
        return false;
    };
    let now = now_ns();
    let tat = if st.reply_tat_ns < now { now } else { st.reply_tat_ns };
    if tat - now > config!(reply_burst_ns) {
        count_drop(service_id, DropReason::RateLimited);
        return false;
    }
    st.reply_tat_ns = tat + config!(reply_interval_ns);
    true
}
