//! Who may do what to a conversation or an agent: pure checks the engine runs before it calls
//! the desk, each returning `ErrorCode::Forbidden` (via [`DeskError::Forbidden`]) with a reason.
//!
//! It owns the role rules and nothing else: the actor comes from the connection's verified
//! token (tenant, role, subject), the conversation's facts from [`super::TenantDesk`]. The rules:
//! - nothing crosses tenants, whatever the role;
//! - a customer touches only its own conversations (open, watch, close, leave);
//! - an agent answers only offers made to it, and watches, transfers or closes only
//!   conversations offered or assigned to it; it sets only its own status;
//! - a supervisor may watch, transfer and close any conversation of its tenant and set any
//!   agent's status, but never answers an offer in an agent's place;
//! - a gateway acts for the end users of its one tenant, so it passes every check within it
//!   (it has authenticated them itself; the desk still checks that an offer is answered by the
//!   agent it was made to).

use switchboard_protocol::Text;

use super::error::DeskError;
use super::fsm::State;

/// The role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An edge gateway acting for many end users of one tenant.
    Gateway,
    /// A customer (end user).
    Customer,
    /// An agent.
    Agent,
    /// A supervisor.
    Supervisor,
}

/// Who is asking, from the connection's verified token.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    /// The token's tenant.
    pub tenant: &'a str,
    /// The token's role.
    pub role: Role,
    /// The token's subject (customer or agent id; the supervisor's or gateway's own id).
    pub subject: &'a str,
}

/// What the actor wants to do to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationAction {
    /// Subscribe to it, read its history, publish in it.
    Watch,
    /// Accept or decline an offer (`OFFER_RESPONSE`).
    RespondToOffer,
    /// Transfer it.
    Transfer,
    /// Close it.
    Close,
    /// Leave it as its customer.
    Leave,
}

/// The facts about a conversation the checks need.
#[derive(Debug, Clone, Copy)]
pub struct ConversationFacts<'a> {
    /// Its tenant.
    pub tenant: &'a str,
    /// Its customer.
    pub customer: &'a Text,
    /// Its state.
    pub state: State,
    /// The agent it is offered or assigned to.
    pub agent: Option<&'a Text>,
}

fn forbid(reason: &'static str) -> Result<(), DeskError> {
    Err(DeskError::Forbidden { reason })
}

/// Refuses anything across tenants.
pub fn check_tenant(actor: &Actor<'_>, tenant: &str) -> Result<(), DeskError> {
    if actor.tenant == tenant {
        Ok(())
    } else {
        forbid("another tenant's resource")
    }
}

/// May `actor` open a conversation for `customer`?
pub fn check_open(actor: &Actor<'_>, tenant: &str, customer: &str) -> Result<(), DeskError> {
    check_tenant(actor, tenant)?;
    match actor.role {
        Role::Gateway => Ok(()),
        Role::Customer if actor.subject == customer => Ok(()),
        Role::Customer => forbid("a customer opens conversations only for itself"),
        Role::Agent | Role::Supervisor => forbid("only customers (or their gateway) open conversations"),
    }
}

/// May `actor` set the status of `agent`?
pub fn check_agent_status(actor: &Actor<'_>, tenant: &str, agent: &str) -> Result<(), DeskError> {
    check_tenant(actor, tenant)?;
    match actor.role {
        Role::Gateway | Role::Supervisor => Ok(()),
        Role::Agent if actor.subject == agent => Ok(()),
        Role::Agent => forbid("an agent sets only its own status"),
        Role::Customer => forbid("customers have no agent status"),
    }
}

/// May `actor` do `action` to the conversation described by `facts`?
#[allow(clippy::match_same_arms)] // One arm per rule reads better than merged patterns.
pub fn check_conversation(actor: &Actor<'_>, action: ConversationAction, facts: &ConversationFacts<'_>) -> Result<(), DeskError> {
    check_tenant(actor, facts.tenant)?;
    let own_customer = actor.role == Role::Customer && facts.customer.as_str() == actor.subject;
    let own_agent = actor.role == Role::Agent && facts.agent.is_some_and(|a| a.as_str() == actor.subject);
    let assigned_to_actor = own_agent && facts.state == State::Active;
    let offered_to_actor = own_agent && facts.state == State::Offered;
    match (actor.role, action) {
        (Role::Gateway, _) => Ok(()),
        (Role::Supervisor, ConversationAction::Watch | ConversationAction::Transfer | ConversationAction::Close) => Ok(()),
        (Role::Supervisor, ConversationAction::RespondToOffer) => forbid("only the agent offered may answer an offer"),
        (Role::Supervisor, ConversationAction::Leave) => forbid("only the customer leaves a conversation"),
        (Role::Customer, ConversationAction::Watch | ConversationAction::Close | ConversationAction::Leave) if own_customer => {
            Ok(())
        }
        (Role::Customer, ConversationAction::RespondToOffer | ConversationAction::Transfer) => {
            forbid("customers do not answer offers or transfer")
        }
        (Role::Customer, _) => forbid("another customer's conversation"),
        (Role::Agent, ConversationAction::RespondToOffer) if offered_to_actor => Ok(()),
        (Role::Agent, ConversationAction::Watch) if own_agent => Ok(()),
        (Role::Agent, ConversationAction::Transfer | ConversationAction::Close) if assigned_to_actor => Ok(()),
        (Role::Agent, ConversationAction::Leave) => forbid("only the customer leaves a conversation"),
        (Role::Agent, _) => forbid("the conversation is not offered or assigned to this agent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [ConversationAction; 5] = [
        ConversationAction::Watch,
        ConversationAction::RespondToOffer,
        ConversationAction::Transfer,
        ConversationAction::Close,
        ConversationAction::Leave,
    ];

    fn actor(tenant: &'static str, role: Role, subject: &'static str) -> Actor<'static> {
        Actor { tenant, role, subject }
    }

    fn allowed(actor: &Actor<'_>, facts: &ConversationFacts<'_>) -> Vec<ConversationAction> {
        ACTIONS.into_iter().filter(|&a| check_conversation(actor, a, facts).is_ok()).collect()
    }

    #[test]
    fn every_role_against_an_active_conversation() {
        use ConversationAction::*;
        let customer = Text::from("cus");
        let agent = Text::from("ann");
        let facts = ConversationFacts { tenant: "t1", customer: &customer, state: State::Active, agent: Some(&agent) };
        assert_eq!(allowed(&actor("t1", Role::Customer, "cus"), &facts), vec![Watch, Close, Leave]);
        assert_eq!(allowed(&actor("t1", Role::Customer, "other"), &facts), vec![]);
        assert_eq!(allowed(&actor("t1", Role::Agent, "ann"), &facts), vec![Watch, Transfer, Close]);
        assert_eq!(allowed(&actor("t1", Role::Agent, "bob"), &facts), vec![]);
        assert_eq!(allowed(&actor("t1", Role::Supervisor, "sup"), &facts), vec![Watch, Transfer, Close]);
        assert_eq!(allowed(&actor("t1", Role::Gateway, "gw"), &facts), ACTIONS.to_vec());
        for role in [Role::Customer, Role::Agent, Role::Supervisor, Role::Gateway] {
            let subject = if role == Role::Agent { "ann" } else { "cus" };
            let other_tenant = Actor { tenant: "t2", role, subject };
            for action in ACTIONS {
                let error = check_conversation(&other_tenant, action, &facts).unwrap_err();
                assert_eq!(error.code(), switchboard_protocol::ErrorCode::Forbidden);
            }
        }
    }

    #[test]
    fn an_offered_agent_may_answer_but_not_transfer() {
        use ConversationAction::*;
        let customer = Text::from("cus");
        let agent = Text::from("ann");
        let facts = ConversationFacts { tenant: "t1", customer: &customer, state: State::Offered, agent: Some(&agent) };
        assert_eq!(allowed(&actor("t1", Role::Agent, "ann"), &facts), vec![Watch, RespondToOffer]);
        assert_eq!(allowed(&actor("t1", Role::Agent, "bob"), &facts), vec![]);
        assert_eq!(allowed(&actor("t1", Role::Supervisor, "sup"), &facts), vec![Watch, Transfer, Close]);
    }

    #[test]
    fn open_and_agent_status() {
        assert!(check_open(&actor("t1", Role::Customer, "cus"), "t1", "cus").is_ok());
        assert!(check_open(&actor("t1", Role::Customer, "cus"), "t1", "other").is_err());
        assert!(check_open(&actor("t1", Role::Gateway, "gw"), "t1", "anyone").is_ok());
        assert!(check_open(&actor("t1", Role::Gateway, "gw"), "t2", "anyone").is_err());
        assert!(check_open(&actor("t1", Role::Agent, "ann"), "t1", "ann").is_err());
        assert!(check_agent_status(&actor("t1", Role::Agent, "ann"), "t1", "ann").is_ok());
        assert!(check_agent_status(&actor("t1", Role::Agent, "ann"), "t1", "bob").is_err());
        assert!(check_agent_status(&actor("t1", Role::Supervisor, "sup"), "t1", "bob").is_ok());
        assert!(check_agent_status(&actor("t1", Role::Customer, "ann"), "t1", "ann").is_err());
        assert!(check_agent_status(&actor("t2", Role::Supervisor, "sup"), "t1", "bob").is_err());
    }
}
