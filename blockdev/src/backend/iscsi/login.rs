//! The login phase (RFC 7143 §6.3, §11.12–13): security stage (CHAP or none), then the
//! operational stage's parameter negotiation, then full feature phase.
//!
//! A pure state machine: [`Login::new`] gives the first request's bytes, each response
//! PDU goes through [`Login::on_response`], which answers with the next request or the
//! result. The driver owns the socket and the deadline. Every step is bounded (at most
//! [`MAX_EXCHANGES`] request/response pairs), and every refusal maps to a
//! [`LoginError`] that says what an operator can do about it.

use super::chap::{self, ChapAlg, ChapCredentials};
use super::pdu::{self, stage, FrameCfg, LoginReq, LoginResp, Pdu};
use super::text::{Keys, Negotiated, Offer};
use std::fmt;

/// Most request/response pairs one login may take.
pub const MAX_EXCHANGES: u32 = 16;

/// What a login needs.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// InitiatorName.
    pub initiator_name: String,
    /// TargetName.
    pub target_name: String,
    /// Initiator session id (the same on a re-login, so the target reinstates the session).
    pub isid: [u8; 6],
    /// CHAP credentials; `None`: no authentication.
    pub chap: Option<ChapCredentials>,
    /// Operational parameters offered.
    pub offer: Offer,
}

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// The target refused with a status (class 2 or 3).
    Refused {
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
    },
    /// The target redirected the login to another address (status class 1).
    Redirect(String),
    /// Authentication could not proceed or the target failed mutual authentication.
    Auth(String),
    /// The target broke the protocol.
    Protocol(String),
}

impl LoginError {
    /// True when retrying the same login cannot help (wrong secret, no such target).
    pub fn is_permanent(&self) -> bool {
        match self {
            LoginError::Refused { class: 2, detail } => *detail != 0x06,
            LoginError::Auth(_) => true,
            _ => false,
        }
    }
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginError::Refused { class, detail } => {
                let what = match (class, detail) {
                    (2, 0x01) => "authentication failed (wrong CHAP user or secret)",
                    (2, 0x02) => {
                        "authorization failed (the target's ACL does not allow this initiator)"
                    }
                    (2, 0x03) => "target not found",
                    (2, 0x04) => "target removed",
                    (2, 0x05) => "unsupported iSCSI version",
                    (2, 0x06) => "too many connections",
                    (2, 0x07) => "missing parameter",
                    (2, 0x08) => "cannot include the connection in the session",
                    (2, 0x09) => "session type not supported",
                    (2, 0x0a) => "session does not exist",
                    (2, 0x0b) => "invalid request during login",
                    (2, _) => "initiator error",
                    (3, 0x01) => "target service unavailable",
                    (3, 0x02) => "target out of resources",
                    (3, _) => "target error",
                    _ => "refused",
                };
                write!(
                    f,
                    "login refused: {what} (status {class:#04x}/{detail:#04x})"
                )
            }
            LoginError::Redirect(a) => write!(f, "login redirected to {a}"),
            LoginError::Auth(m) => write!(f, "CHAP: {m}"),
            LoginError::Protocol(m) => write!(f, "login protocol error: {m}"),
        }
    }
}

impl std::error::Error for LoginError {}

/// The outcome of a successful login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginDone {
    /// Parameters in force.
    pub params: Negotiated,
    /// Target session identifying handle.
    pub tsih: u16,
    /// CmdSN of the first command.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// ExpCmdSN and MaxCmdSN from the last response.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// CHAP algorithm used, if any.
    pub chap: Option<ChapAlg>,
}

impl LoginDone {
    /// The sequence numbers the session starts with.
    pub fn start_sn(&self) -> super::session::StartSn {
        super::session::StartSn {
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
        }
    }
}

/// The next thing to do.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes (one login request) and wait for the response.
    Send(Vec<u8>),
    /// Full feature phase reached.
    Done(LoginDone),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// First security request sent (AuthMethod offered).
    SecurityStart,
    /// CHAP_A sent.
    ChapAlgorithm,
    /// CHAP_N/CHAP_R sent.
    ChapResponse,
    /// Operational keys sent.
    Operational,
}

/// A login in progress.
pub struct Login {
    cfg: LoginConfig,
    state: State,
    exchanges: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    tsih: u16,
    params: Negotiated,
    chap_alg: Option<ChapAlg>,
    /// Mutual CHAP: identifier and challenge Ember sent.
    our_challenge: Option<(u8, Vec<u8>)>,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("state", &self.state)
            .field("exchanges", &self.exchanges)
            .finish_non_exhaustive()
    }
}

const PLAIN: FrameCfg = FrameCfg {
    header_digest: false,
    data_digest: false,
    max_data: pdu::MAX_DSL,
};

impl Login {
    /// Start a login with initial CmdSN `cmd_sn`; returns it and the first request.
    pub fn new(cfg: LoginConfig, cmd_sn: u32) -> (Login, Vec<u8>) {
        let params = Negotiated::defaults(&cfg.offer);
        let mut l = Login {
            cfg,
            state: State::SecurityStart,
            exchanges: 0,
            cmd_sn,
            exp_stat_sn: 0,
            tsih: 0,
            params,
            chap_alg: None,
            our_challenge: None,
        };
        let mut k = Keys::new();
        k.push("InitiatorName", l.cfg.initiator_name.clone());
        k.push("SessionType", "Normal");
        k.push("TargetName", l.cfg.target_name.clone());
        let first = if l.cfg.chap.is_some() {
            // Offer CHAP only: a target that skips authentication must not be used
            // silently when credentials were configured (mutual CHAP would be void).
            k.push("AuthMethod", "CHAP");
            l.request(stage::SECURITY, stage::OPERATIONAL, false, &k)
        } else {
            k.push("AuthMethod", "None");
            l.request(stage::SECURITY, stage::OPERATIONAL, true, &k)
        };
        (l, first)
    }

    fn request(&mut self, csg: u8, nsg: u8, transit: bool, keys: &Keys) -> Vec<u8> {
        self.exchanges += 1;
        let p = Pdu::LoginReq(LoginReq {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: self.cfg.isid,
            tsih: self.tsih,
            itt: 0,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        let mut out = Vec::new();
        pdu::encode_frame(&p, &keys.encode(), &PLAIN, &mut out);
        out
    }

    fn operational(&mut self, extra: &Keys) -> Vec<u8> {
        self.state = State::Operational;
        let mut k = self.cfg.offer.keys();
        k.0.extend(extra.0.iter().cloned());
        self.request(stage::OPERATIONAL, stage::FULL_FEATURE, true, &k)
    }

    /// Handle one login response (`data`: its data segment).
    pub fn on_response(&mut self, r: &LoginResp, data: &[u8]) -> Result<Step, LoginError> {
        let proto = |m: String| LoginError::Protocol(m);
        if r.status_class != 0 {
            let keys = Keys::parse(data).unwrap_or_default();
            if r.status_class == 1 {
                let to = keys.get("TargetAddress").unwrap_or("(no TargetAddress)");
                return Err(LoginError::Redirect(to.to_string()));
            }
            if (r.status_class, r.status_detail) == (2, 1) && self.cfg.chap.is_none() {
                return Err(LoginError::Auth(
                    "the target requires authentication (CHAP); configure credentials".into(),
                ));
            }
            if let (State::ChapResponse, 2, 0 | 1, Some(alg)) =
                (self.state, r.status_class, r.status_detail, self.chap_alg)
            {
                if alg != ChapAlg::Md5 {
                    // tgtd (1.0.85 to 1.0.97) answers CHAP_A=7 but expects a SHA-1
                    // response for it: the login fails whatever the secret.
                    return Err(LoginError::Auth(format!(
                        "the target refused the CHAP response (status 0x02/0x{:02x}) with \
                         CHAP_A={} ({alg:?}): a wrong secret, or a target that computes \
                         another digest for that code (tgtd does SHA-1 for 7); offer MD5 \
                         only (chap-algorithms = [\"md5\"]) to tell",
                        r.status_detail,
                        alg.code()
                    )));
                }
            }
            return Err(LoginError::Refused {
                class: r.status_class,
                detail: r.status_detail,
            });
        }
        if r.cont {
            return Err(proto("continued login responses are not supported".into()));
        }
        if r.version_active != 0 {
            return Err(proto(format!("version {} is not 0", r.version_active)));
        }
        if r.isid != self.cfg.isid || r.itt != 0 {
            return Err(proto("response for another login".into()));
        }
        if self.exchanges >= MAX_EXCHANGES {
            return Err(proto(format!(
                "no progress after {MAX_EXCHANGES} exchanges"
            )));
        }
        self.exp_stat_sn = r.sn.stat_sn.wrapping_add(1);
        self.tsih = r.tsih;
        let keys = Keys::parse(data).map_err(|e| proto(e.to_string()))?;
        match self.state {
            State::SecurityStart => {
                if r.csg != stage::SECURITY {
                    return Err(proto(format!("stage {} in a security response", r.csg)));
                }
                match (keys.get("AuthMethod"), &self.cfg.chap) {
                    (Some("CHAP"), Some(c)) => {
                        self.state = State::ChapAlgorithm;
                        let algs: Vec<String> =
                            c.algorithms.iter().map(|a| a.code().to_string()).collect();
                        let mut k = Keys::new();
                        k.push("CHAP_A", algs.join(","));
                        Ok(Step::Send(self.request(
                            stage::SECURITY,
                            stage::OPERATIONAL,
                            false,
                            &k,
                        )))
                    }
                    (Some("CHAP"), None) => Err(LoginError::Auth(
                        "the target requires authentication (CHAP); configure credentials".into(),
                    )),
                    (Some("None"), None) if r.transit && r.nsg == stage::OPERATIONAL => {
                        Ok(Step::Send(self.operational(&Keys::new())))
                    }
                    (Some("None"), None) => Ok(Step::Send(self.request(
                        stage::SECURITY,
                        stage::OPERATIONAL,
                        true,
                        &Keys::new(),
                    ))),
                    (other, _) => Err(LoginError::Auth(format!(
                        "target answered AuthMethod={}",
                        other.unwrap_or("(nothing)")
                    ))),
                }
            }
            State::ChapAlgorithm => self.chap_challenge(&keys),
            State::ChapResponse => {
                if let Some((tuser, tsecret)) =
                    self.cfg.chap.as_ref().and_then(|c| c.target.clone())
                {
                    let (id, ch) = self
                        .our_challenge
                        .clone()
                        .ok_or_else(|| proto("mutual CHAP without a challenge".into()))?;
                    let alg = self.chap_alg.unwrap_or(ChapAlg::Md5);
                    let n = keys.get("CHAP_N");
                    let got = keys.get("CHAP_R").and_then(chap::decode_binary);
                    let want = alg.response(id, &tsecret, &ch);
                    if n != Some(tuser.as_str()) {
                        return Err(LoginError::Auth(format!(
                            "the target answered as {:?}, expected {tuser:?}",
                            n.unwrap_or("")
                        )));
                    }
                    if got.as_deref() != Some(want.as_slice()) {
                        return Err(LoginError::Auth(
                            "the target failed mutual authentication (wrong target secret)".into(),
                        ));
                    }
                }
                if !(r.transit && r.nsg == stage::OPERATIONAL) {
                    return Err(proto("the target did not leave the security stage".into()));
                }
                Ok(Step::Send(self.operational(&Keys::new())))
            }
            State::Operational => {
                if r.csg != stage::OPERATIONAL {
                    return Err(proto(format!("stage {} in an operational response", r.csg)));
                }
                let reply = self
                    .params
                    .apply(&self.cfg.offer, &keys)
                    .map_err(|e| proto(e.to_string()))?;
                if r.transit && r.nsg == stage::FULL_FEATURE {
                    return Ok(Step::Done(LoginDone {
                        params: self.params,
                        tsih: r.tsih,
                        cmd_sn: self.cmd_sn,
                        exp_stat_sn: self.exp_stat_sn,
                        exp_cmd_sn: r.sn.exp_cmd_sn,
                        max_cmd_sn: r.sn.max_cmd_sn,
                        chap: self.chap_alg,
                    }));
                }
                // The target wants another round: answer what it asked, keep transiting.
                Ok(Step::Send(self.request(
                    stage::OPERATIONAL,
                    stage::FULL_FEATURE,
                    true,
                    &reply,
                )))
            }
        }
    }

    fn chap_challenge(&mut self, keys: &Keys) -> Result<Step, LoginError> {
        let auth = LoginError::Auth;
        let c = self
            .cfg
            .chap
            .clone()
            .ok_or_else(|| auth("no credentials".into()))?;
        let alg = keys
            .get("CHAP_A")
            .and_then(|a| a.parse().ok())
            .and_then(ChapAlg::from_code)
            .filter(|a| c.algorithms.contains(a))
            .ok_or_else(|| {
                auth(format!(
                    "the target chose CHAP_A={}, which was not offered",
                    keys.get("CHAP_A").unwrap_or("(nothing)")
                ))
            })?;
        let id: u8 = keys
            .get("CHAP_I")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| auth("missing or bad CHAP_I".into()))?;
        let ch = keys
            .get("CHAP_C")
            .and_then(chap::decode_binary)
            .ok_or_else(|| auth("missing or bad CHAP_C".into()))?;
        if ch.len() < chap::MIN_CHALLENGE_BYTES.min(alg.digest_len())
            || ch.len() > chap::MAX_CHALLENGE_BYTES
        {
            return Err(auth(format!("challenge of {} bytes refused", ch.len())));
        }
        let mut k = Keys::new();
        k.push("CHAP_N", c.user.clone());
        k.push(
            "CHAP_R",
            chap::encode_hex(&alg.response(id, &c.secret, &ch)),
        );
        if c.target.is_some() {
            let mut mine = vec![0u8; chap::OUR_CHALLENGE_BYTES];
            getrandom::fill(&mut mine).map_err(|e| auth(format!("no randomness: {e}")))?;
            if mine == ch {
                // RFC 7143 §12.1.3: a reflected challenge is an attack.
                return Err(auth("the target reflected our challenge".into()));
            }
            let mut idb = [0u8; 1];
            getrandom::fill(&mut idb).map_err(|e| auth(format!("no randomness: {e}")))?;
            k.push("CHAP_I", idb[0].to_string());
            k.push("CHAP_C", chap::encode_hex(&mine));
            self.our_challenge = Some((idb[0], mine));
        }
        self.chap_alg = Some(alg);
        self.state = State::ChapResponse;
        Ok(Step::Send(self.request(
            stage::SECURITY,
            stage::OPERATIONAL,
            true,
            &k,
        )))
    }
}
