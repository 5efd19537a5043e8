//! The lease threads' connection to Redis: blocking, with a timeout on
//! connecting and on every round trip, and one Lua script that grants the
//! tokens of many buckets in a single round trip (`EVALSHA`, loaded again
//! by the client when a restarted Redis lost it).
//!
//! Owns: the script and its reply. Must not: be used outside the master's
//! lease threads (it blocks).

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, RedisConnectionInfo};

use super::RedisAddr;

/// Grants tokens of the window counters named in KEYS, three keys per
/// bucket: the counter of the window leased, the demand counter this host
/// adds its last window's demand to, and the demand counter of the window
/// before that (complete: every host added to it a window ago). ARGV[1] is
/// the keys' time to live (ms); then four values per bucket: tokens asked,
/// the window's capacity, the demand to add, whether to add it. Returns,
/// per bucket: tokens granted, tokens left in the window, fleet demand of
/// the earlier window. A counter never passes its capacity: the fleet
/// total of a window is at most its capacity, whatever the hosts ask.
const SCRIPT: &str = r"
local ttl = ARGV[1]
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local counter, add_to, read_from = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local ask, cap = tonumber(ARGV[4 * i + 2]), tonumber(ARGV[4 * i + 3])
  local demand, report = tonumber(ARGV[4 * i + 4]), ARGV[4 * i + 5]
  local used = tonumber(redis.call('GET', counter) or '0')
  local grant = math.min(ask, cap - used)
  if grant > 0 then
    used = redis.call('INCRBY', counter, grant)
    if used == grant then redis.call('PEXPIRE', counter, ttl) end
  else
    grant = 0
  end
  if report == '1' and demand > 0 then
    if redis.call('INCRBY', add_to, demand) == demand then redis.call('PEXPIRE', add_to, ttl) end
  end
  out[#out + 1] = grant
  out[#out + 1] = math.max(cap - used, 0)
  out[#out + 1] = tonumber(redis.call('GET', read_from) or '0')
end
return out
";

/// One bucket's part of a round trip.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The counter of the window leased.
    pub counter: Vec<u8>,
    /// The demand counter to add to, and the one to read.
    pub demand_add: Vec<u8>,
    /// The demand counter read (the window before `demand_add`'s).
    pub demand_read: Vec<u8>,
    /// Tokens asked.
    pub tokens: u64,
    /// The window's capacity.
    pub cap: u64,
    /// This host's demand to report (`None`: no report in this ask).
    pub report: Option<u64>,
}

/// What Redis granted one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens granted.
    pub tokens: u64,
    /// Tokens left in the window after the grant.
    pub left: u64,
    /// The fleet's demand in the window of `demand_read`.
    pub fleet_demand: u64,
}

/// A connection to Redis.
pub struct Client {
    con: redis::Connection,
    script: redis::Script,
}

/// Why a round trip failed.
pub type Error = redis::RedisError;

impl Client {
    /// Connects within `timeout`; every round trip is bounded by it too.
    pub fn connect(addr: &RedisAddr, timeout: Duration) -> Result<Client, Error> {
        let addr = match addr {
            RedisAddr::Tcp(h, p) => ConnectionAddr::Tcp(h.clone(), *p),
            RedisAddr::Unix(p) => ConnectionAddr::Unix(p.clone()),
        };
        let info = ConnectionInfo { addr, redis: RedisConnectionInfo::default() };
        let con = redis::Client::open(info)?.get_connection_with_timeout(timeout)?;
        con.set_read_timeout(Some(timeout))?;
        con.set_write_timeout(Some(timeout))?;
        Ok(Client { con, script: redis::Script::new(SCRIPT) })
    }

    /// One round trip for every bucket of `asks` (`ttl_ms`: the keys' life).
    pub fn lease(&mut self, asks: &[Ask], ttl_ms: u64) -> Result<Vec<Grant>, Error> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(ttl_ms);
        for a in asks {
            inv.key(&a.counter[..]).key(&a.demand_add[..]).key(&a.demand_read[..]);
            inv.arg(a.tokens).arg(a.cap).arg(a.report.unwrap_or(0)).arg(u8::from(a.report.is_some()));
        }
        let flat: Vec<i64> = inv.invoke(&mut self.con)?;
        if flat.len() != asks.len() * 3 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "the lease script answered the wrong count",
            )));
        }
        let u = |v: i64| v.max(0) as u64;
        Ok(flat.chunks(3).map(|c| Grant { tokens: u(c[0]), left: u(c[1]), fleet_demand: u(c[2]) }).collect())
    }
}
